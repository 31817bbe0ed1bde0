# tiny (busybox init) runs this from tiny-init: the boot check that systemd images run as
# obelisk-boot-check.service. It marks the slot good, or reboots a failed trial boot.
/usr/lib/obelisk/obelisk-boot-check
