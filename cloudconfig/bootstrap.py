"""Bootstrap into the control plane: etcd member/proxy settings, update.conf, lock.conf.

etcd 3.4 reads every flag from an ETCD_* environment variable, so coreos.etcd2 becomes an
environment file loaded by a drop-in for Debian's etcd.service (which is also etcd2.service by
alias). update.conf and lock.conf go through their owners' models (obelisk.update_conf,
obelisk.lock_conf), so what cloud-config writes is exactly what the daemon accepts.
"""

from __future__ import annotations

import re

from cloudconfig.model import CloudConfig
from cloudconfig.rootfs import ConfigApplyError, Plan
from cloudconfig.schema import BOOL_WORDS

ETCD_ENV = "/etc/obelisk/etcd.env"
ETCD_DROPIN = "/etc/systemd/system/etcd.service.d/20-obelisk-cloudconfig.conf"
UPDATE_CONF = "/etc/obelisk/update.conf"
UPDATE_CONF_USR = "/usr/share/obelisk/update.conf"
LOCK_CONF = "/etc/obelisk/lock.conf"

_RENAMED = {"ca_file": "trusted_ca_file", "peer_ca_file": "peer_trusted_ca_file"}
# etcd 0.4 host:port settings -> etcd 3.4 URL flags
_LEGACY = {"addr": "advertise_client_urls", "bind_addr": "listen_client_urls",
           "peer_addr": "initial_advertise_peer_urls", "peer_bind_addr": "listen_peer_urls"}
_BOOL_KEYS = {"client_cert_auth", "peer_client_cert_auth", "strict_reconfig_check", "force_new_cluster", "debug",
              "enable_pprof"}
TLS_KEYS = ("cert_file", "key_file", "trusted_ca_file", "peer_cert_file", "peer_key_file", "peer_trusted_ca_file",
            "ca_file", "peer_ca_file")
PRIVATE_KEYS = ("key_file", "peer_key_file")


def etcd_environment(etcd: dict[str, str], legacy: bool = False) -> dict[str, str]:
    """coreos.etcd2 keys -> ETCD_* variables etcd 3.4 understands (in a stable order)."""
    env: dict[str, str] = {}
    for key in sorted(etcd):
        value = etcd[key]
        if key == "peers":
            continue  # etcd 0.4 only; the validator warned
        if legacy and key in _LEGACY:
            key, value = _LEGACY[key], value if "://" in value else f"http://{value}"
        key = _RENAMED.get(key, key)
        if key in _BOOL_KEYS:
            value = BOOL_WORDS.get(value.lower(), value)
        env[f"ETCD_{key.upper()}"] = value
    return env


def _quote(value: str) -> str:
    # systemd EnvironmentFile: double quotes keep spaces; backslash escapes " and \
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./\[\]-]*", value) and value:
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_env(env: dict[str, str]) -> str:
    head = "# etcd settings written by obelisk cloudconfig from coreos.etcd2; etcd reads ETCD_* variables\n"
    return head + "".join(f"{k}={_quote(v)}\n" for k, v in env.items())


def plan_etcd(plan: Plan, cfg: CloudConfig, live: bool = False, tls_changed: bool = False) -> None:
    """ETCD_* settings for Debian's etcd.service. The image ships etcd installed but not enabled: on the
    live host, a config with an etcd section enables it, and starts it (restarts it when its settings or
    TLS files changed). Queued with --no-block: this runs before etcd.service, which waits for it."""
    if not cfg.etcd:
        return
    env = etcd_environment(cfg.etcd, cfg.etcd_legacy)
    changed = plan.write(ETCD_ENV, render_env(env).encode(), 0o644, why="coreos.etcd2")
    dropin = ("# Written by obelisk cloudconfig: etcd member/proxy settings from coreos.etcd2\n"
              f"[Service]\nEnvironmentFile={ETCD_ENV}\n")
    changed |= plan.write(ETCD_DROPIN, dropin.encode(), 0o644, why="coreos.etcd2")
    if live:
        plan.commands.append(["systemctl", "enable", "etcd.service"])
        plan.commands.append(["systemctl", "--no-block", "restart" if changed or tls_changed else "start",
                              "etcd.service"])


def _conf_error(name: str, exc: Exception) -> ConfigApplyError:
    return ConfigApplyError(f"{name}: {exc}")


def plan_update(plan: Plan, cfg: CloudConfig) -> None:
    if not cfg.update:
        return
    from obelisk.update_conf import UpdateConf, UpdateConfigError, parse_kv

    merged: dict[str, str] = {}
    try:
        for path in (UPDATE_CONF_USR, UPDATE_CONF):  # keep /usr's defaults explicit: /etc wins key by key
            text = plan.read_text(path)
            if text is not None:
                merged.update(parse_kv(text, path))
        for key, conf_key in (("server", "SERVER"), ("group", "GROUP"), ("reboot_strategy", "REBOOT_STRATEGY")):
            if key in cfg.update:
                merged[conf_key] = cfg.update[key]
        conf = UpdateConf.from_kv(merged, "coreos.update", strict=False)
    except UpdateConfigError as exc:
        raise _conf_error("update.conf", exc) from None
    plan.write(UPDATE_CONF, conf.render().encode(), 0o644, why="coreos.update")


_LOCK_MAP = {"endpoint": "endpoint", "group": "group", "window_start": "window_start",
             "window_length": "window_length", "etcd_cafile": "cafile", "etcd_certfile": "certfile",
             "etcd_keyfile": "keyfile"}


def lock_settings(cfg: CloudConfig) -> dict[str, str]:
    return {_LOCK_MAP[k]: v for k, v in cfg.locksmith.items() if k in _LOCK_MAP}


def plan_lock(plan: Plan, cfg: CloudConfig) -> None:
    fields = lock_settings(cfg)
    if not fields:
        return
    from obelisk.lock_conf import LockConfig, LockConfigError

    try:
        base = LockConfig.parse(plan.read_text(LOCK_CONF) or "", LOCK_CONF).model_dump(exclude_defaults=True)
        conf = LockConfig.model_validate({**base, **fields})
    except (LockConfigError, ValueError) as exc:
        raise _conf_error("lock.conf", exc) from None
    plan.write(LOCK_CONF, conf.render().encode(), 0o644, why="coreos.locksmith")


def check_settings(cfg: CloudConfig) -> list[tuple[str, str]]:
    """(path, message) for values the owners' models reject, so validate reports them with a line."""
    out: list[tuple[str, str]] = []
    if cfg.update:
        from obelisk.update_conf import UpdateConf
        from obelisk.update_conf import UpdateConfigError as UErr

        for key, conf_key in (("server", "SERVER"), ("group", "GROUP"), ("reboot_strategy", "REBOOT_STRATEGY")):
            if key in cfg.update:
                try:
                    UpdateConf.from_kv({conf_key: cfg.update[key]}, "update.conf", strict=False)
                except UErr as exc:
                    msg = str(exc).removeprefix("update.conf: ").removeprefix(f"{conf_key}: ")
                    out.append((f"coreos.update.{key}", f"update.conf rejects {key}: {msg}"))
    fields = lock_settings(cfg)
    if fields:
        from obelisk.lock_conf import LockConfig

        for key, value in fields.items():
            probe = {key: value}
            if key in ("window_start", "window_length"):
                probe = {"window_start": fields.get("window_start", "00:00"),
                         "window_length": fields.get("window_length", "1h")}
            if key in ("certfile", "keyfile"):
                probe = {"certfile": fields.get("certfile", "x"), "keyfile": fields.get("keyfile", "x")}
            try:
                LockConfig.model_validate(probe)
            except ValueError as exc:
                errs = getattr(exc, "errors", None)
                msg = errs()[0]["msg"] if callable(errs) else str(exc)
                lk = {v: k for k, v in _LOCK_MAP.items()}[key]
                out.append((f"coreos.locksmith.{lk}", f"lock.conf rejects {lk}: "
                            + str(msg).removeprefix("Value error, ")))
    return out
