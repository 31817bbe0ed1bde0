"""The provisioning server: per-host iPXE/GRUB boot scripts and cloud-config chosen by MAC, UUID or labels."""
