"""Bad input: random bytes and random YAML (shaped like cloud-config) fed to validate and apply.

Never a traceback: validate always returns a report; apply either applies or raises ConfigApplyError
(one line, nothing changed); the CLI turns both into output and an exit code.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import yaml
from cloudconfig_helpers import make_root, tree_digest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cloudconfig.apply import ConfigApplyError, apply_userdata
from cloudconfig.cli import app
from cloudconfig.validate import validate_bytes

KEYS = ["hostname", "users", "write_files", "write-files", "ssh_authorized_keys", "manage_etc_hosts", "coreos",
        "etcd2", "etcd", "update", "locksmith", "units", "name", "content", "path", "permissions", "owner",
        "encoding", "enable", "command", "runtime", "mask", "drop_ins", "drop-ins", "groups", "primary_group",
        "system", "passwd", "homedir", "shell", "reboot_strategy", "reboot-strategy", "group", "server", "endpoint",
        "window_start", "window_length", "initial_cluster", "discovery", "proxy", "key_file", "no_create_home",
        "bogus"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["/etc/x", "/usr/x", "/etc/passwd/x", "0644", "0999", "b64", "gzip+base64", "etcd-lock",
                     "a.service", "10-x.conf", "start", "Thu 04:00", "1h", "http://127.0.0.1:2379", "root:root",
                     "sudo", "localhost", "m0=http://127.0.0.1:2380", "$private_ipv4", "on", "", "..", "/"]),
    st.text(max_size=20),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
    max_leaves=25,
)
CONFIGS = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6)


def _opt(**fields: st.SearchStrategy) -> st.SearchStrategy:
    """A dict where every field may be missing: near-valid items reach deep into apply."""
    return st.fixed_dictionaries({}, optional=fields)


PATHS = st.sampled_from(["/etc/a", "/etc/a/b", "/etc/ssl/k.pem", "/var/lib/x/y", "/etc/passwd", "/etc/hostname",
                         "/home/alice/.ssh/authorized_keys", "/etc/systemd/system/a.service", "/etc"])
SHAPED = _opt(
    hostname=st.sampled_from(["h1", "node-2.example.com", "bad_name"]),
    manage_etc_hosts=st.sampled_from(["localhost", "yes"]),
    ssh_authorized_keys=st.lists(st.sampled_from(["ssh-ed25519 AAAA x", ""]), max_size=2),
    users=st.lists(_opt(name=st.sampled_from(["alice", "core", "root", "etcd", "b0b"]),
                        groups=st.lists(st.sampled_from(["sudo", "docker", "nosuch", "alice"]), max_size=2),
                        primary_group=st.sampled_from(["users", "alice", "nosuch"]),
                        system=st.booleans(), no_create_home=st.booleans(), no_user_group=st.booleans(),
                        passwd=st.sampled_from(["$6$a$b", "*"]),
                        ssh_authorized_keys=st.lists(st.just("ssh-ed25519 AAAAk"), max_size=1)), max_size=3),
    write_files=st.lists(_opt(path=PATHS,
                              content=st.sampled_from(["x", "aGk=", "H4sIAAAAAAAAA8tIzcnJVyjPL8pJAQCFEUoNCwAAAA=="]),
                              permissions=st.sampled_from(["0600", "644", "4755", "0999"]),
                              owner=st.sampled_from(["root", "alice:sudo", "etcd:etcd", "1234:1234", "nobody"]),
                              encoding=st.sampled_from(["b64", "gzip+base64", "gz"])), max_size=4),
    coreos=_opt(
        etcd2=_opt(name=st.sampled_from(["m0", "m1"]), initial_cluster=st.just("m0=http://127.0.0.1:2380"),
                   key_file=PATHS, proxy=st.sampled_from(["on", "off"]), discovery=st.just("https://d.example/x")),
        update=_opt(group=st.sampled_from(["beta", "a b"]), reboot_strategy=st.sampled_from(["off", "etcd-lock"]),
                    server=st.just("http://u.example/")),
        locksmith=_opt(endpoint=st.just("http://127.0.0.1:2379"), group=st.sampled_from(["g", "g/1"]),
                       window_start=st.just("Mon 02:00"), window_length=st.sampled_from(["1h", "0s"])),
        units=st.lists(_opt(name=st.sampled_from(["a.service", "etcd2.service", "sshd.service", "x@.service",
                                                  "n.network", "missing.service"]),
                            content=st.sampled_from(["[Install]\nWantedBy=multi-user.target\n", "[Service]\n"]),
                            enable=st.booleans(), mask=st.booleans(), runtime=st.booleans(),
                            command=st.sampled_from(["start", "stop"]),
                            drop_ins=st.lists(_opt(name=st.sampled_from(["10-a.conf", "b.conf"]),
                                                   content=st.just("[Service]\n")), max_size=2)), max_size=3)),
)
runner = CliRunner()
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _dump(cfg: object) -> bytes:
    return b"#cloud-config\n" + yaml.safe_dump(cfg, allow_unicode=True).encode()


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_validate(data: bytes) -> None:
    rep = validate_bytes(data)
    assert rep.kind in ("cloud-config", "script", "ignition", "empty", "invalid")
    assert all(e.line >= 1 and e.level in ("error", "warning") and e.message for e in rep.entries)


@FUZZ
@given(st.binary(max_size=200).map(lambda b: b"#cloud-config\n" + b))
def test_random_bytes_after_header(data: bytes) -> None:
    validate_bytes(data)


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("#:-[]{}&*!|>'\"\n\t ab01$%@`,?")), max_size=120))
def test_random_yaml_punctuation(text: str) -> None:
    rep = validate_bytes(("#cloud-config\n" + text).encode())
    assert all(e.line >= 1 for e in rep.entries)


@FUZZ
@given(st.one_of(CONFIGS, SHAPED))
def test_random_configs_validate_and_apply(cfg: dict) -> None:
    raw = _dump(cfg)
    rep = validate_bytes(raw)
    with tempfile.TemporaryDirectory() as d:
        root = make_root(Path(d) / "root")
        before = tree_digest(root)
        try:
            apply_userdata(raw, root, addresses={"private_ipv4": "10.0.0.1"})
        except ConfigApplyError as exc:
            assert str(exc) and "\n" not in str(exc)
            assert tree_digest(root) == before  # refused: nothing changed
        else:
            assert rep.ok or not rep.errors  # applied only what validated
            assert not apply_userdata(raw, root, addresses={"private_ipv4": "10.0.0.1"}).changed
        shutil.rmtree(root)


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.binary(max_size=200), CONFIGS.map(_dump)))
def test_cli_never_shows_a_traceback(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "cc"
        f.write_bytes(data)
        root = make_root(Path(d) / "root")
        for args in (["validate", str(f)], ["validate", "--json", str(f)], ["apply", str(f), "--root", str(root)]):
            res = runner.invoke(app, args)
            assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
            assert "Traceback" not in res.output
            assert res.exit_code in (0, 1, 2)
