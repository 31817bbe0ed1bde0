"""Typed view of a validated cloud-config (built from validate.Report.value, keys already underscored)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class User:
    name: str
    gecos: str | None = None
    passwd: str | None = None
    homedir: str | None = None
    no_create_home: bool = False
    primary_group: str | None = None
    groups: list[str] = field(default_factory=list)
    no_user_group: bool = False
    ssh_authorized_keys: list[str] = field(default_factory=list)
    system: bool = False
    no_log_init: bool = False
    shell: str | None = None


@dataclass
class WriteFile:
    path: str
    content: str | bytes = ""
    permissions: str | None = None
    owner: str | None = None
    encoding: str | None = None


@dataclass
class DropIn:
    name: str
    content: str = ""


@dataclass
class Unit:
    name: str
    content: str | None = None
    enable: bool = False
    command: str | None = None
    runtime: bool = False
    mask: bool = False
    drop_ins: list[DropIn] = field(default_factory=list)


@dataclass
class CloudConfig:
    hostname: str | None = None
    ssh_authorized_keys: list[str] = field(default_factory=list)
    users: list[User] = field(default_factory=list)
    write_files: list[WriteFile] = field(default_factory=list)
    manage_etc_hosts: str | None = None
    etcd: dict[str, str] = field(default_factory=dict)  # coreos.etcd2 (or coreos.etcd), raw strings
    etcd_legacy: bool = False  # came from coreos.etcd (etcd 0.4 spellings)
    update: dict[str, str] = field(default_factory=dict)
    locksmith: dict[str, str] = field(default_factory=dict)
    units: list[Unit] = field(default_factory=list)
    oem: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_value(cls, v: dict[str, Any]) -> CloudConfig:
        coreos = v.get("coreos", {})
        etcd, legacy = (coreos["etcd2"], False) if "etcd2" in coreos else (coreos.get("etcd", {}), "etcd" in coreos)
        return cls(
            hostname=v.get("hostname"),
            ssh_authorized_keys=list(v.get("ssh_authorized_keys", [])),
            users=[User(**_known(User, u)) for u in v.get("users", [])],
            write_files=[WriteFile(**_known(WriteFile, w)) for w in v.get("write_files", [])],
            manage_etc_hosts=v.get("manage_etc_hosts"),
            etcd={k: str(x) for k, x in etcd.items()},
            etcd_legacy=legacy,
            update={k: str(x) for k, x in coreos.get("update", {}).items()},
            locksmith={k: str(x) for k, x in coreos.get("locksmith", {}).items()},
            units=[Unit(**{**_known(Unit, u), "drop_ins": [DropIn(**d) for d in u.get("drop_ins", [])]})
                   for u in coreos.get("units", [])],
            oem={k: str(x) for k, x in coreos.get("oem", {}).items()},
        )


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    return {k: x for k, x in d.items() if k in names and k != "drop_ins"}
