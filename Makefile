# Two commands: `make image` (install everything, build the default image) and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := cgpt gdisk fdisk qemu-system-x86 qemu-utils ovmf squashfs-tools cryptsetup-bin \
	grub-efi-amd64-bin grub-common grub2-common mmdebstrap etcd-server etcd-client dosfstools mtools \
	busybox-static e2fsprogs kmod cpio xz-utils zstd curl grub-emu wrk postgresql \
	chromium chromium-driver openssh-client \
	libparted-dev pkg-config
IMAGE ?= images/base.toml

.PHONY: setup image test fleet-test lint bench clean

.stamp-apt: Makefile
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -q && \
	DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $(APT_PACKAGES)
	touch $@

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev,install]'
	touch $@

setup: .stamp-apt $(VENV)/.installed

image: setup
	$(VENV)/bin/obelisk image build $(IMAGE)

test: setup
	$(VENV)/bin/pytest -q -ra tests

# The fleet end to end (3 VMs, about 65 minutes under TCG here): not in `make test`, see docs/fleet-run.md.
fleet-test: setup
	OBELISK_FLEET_HOSTS=$${HOSTS:-3} $(VENV)/bin/pytest -q -ra tests/vm/test_fleet.py

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m bench $(BENCH)

clean:
	rm -rf out .stamp-apt $(VENV)
