"""Helpers for cloud-config tests: a small target root that looks like an obelisk host's, and a tree hash."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

HERE = Path(__file__).parent
CORPUS = HERE / "corpus"

PASSWD = "root:x:0:0:root:/root:/bin/bash\netcd:x:998:998:etcd:/var/lib/etcd:/usr/sbin/nologin\n"
GROUP = "root:x:0:\nshadow:x:42:\nsudo:x:27:\nusers:x:100:\ndocker:x:997:\netcd:x:998:\n"
SHADOW = "root:*:19000:0:99999:7:::\netcd:!:19000::::::\n"
# Debian bookworm's etcd-server unit, trimmed (the [Install] section is what enable reads).
ETCD_UNIT = """[Unit]
Description=etcd - highly-available key value store
After=network.target

[Service]
Environment=ETCD_DATA_DIR=/var/lib/etcd/default
EnvironmentFile=-/etc/default/%p
Type=notify
User=etcd
ExecStart=/usr/bin/etcd $DAEMON_ARGS

[Install]
WantedBy=multi-user.target
Alias=etcd2.service
"""


def make_root(root: Path) -> Path:
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    (root / "etc/shadow").write_text(SHADOW)
    os.chmod(root / "etc/shadow", 0o640)
    os.chown(root / "etc/shadow", 0, 42)
    (root / "etc/hostname").write_text("localhost\n")
    units = root / "usr/lib/systemd/system"
    units.mkdir(parents=True)
    (units / "etcd.service").write_text(ETCD_UNIT)
    sshd = "[Service]\nExecStart=/usr/sbin/sshd -D\n[Install]\nWantedBy=multi-user.target\n"
    (units / "sshd.service").write_text(sshd)
    (root / "usr/share/obelisk").mkdir(parents=True)
    (root / "usr/share/obelisk/update.conf").write_text("GROUP=stable\nSERVER=https://updates.example.com/v1/update/\n")
    (root / "home").mkdir()
    return root


def tree_digest(root: Path) -> str:
    """Hash of every path, type, mode, owner, link target and content under root."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            p = Path(dirpath) / name
            st = p.lstat()
            h.update(f"{p.relative_to(root)}|{st.st_mode:o}|{st.st_uid}|{st.st_gid}\n".encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()
