"""Hypothesis on the JSON and YAML readers, validation, apply and merge: never a traceback, never a
hang (each example has a deadline), nothing outside the root, nothing changed on failure."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from cloudconfig_helpers import make_root
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ignition_support import tree

from cloudconfig import ignition
from cloudconfig.ignition.butane import snake
from cloudconfig.ignition.merge import merge
from cloudconfig.ignition.reader import ReadError, read_json, read_yaml
from cloudconfig.ignition.spec import SCHEMA, SPECS, Checker, T
from obelisk.errors import ObeliskError

pytestmark = pytest.mark.timeout(600)
# max_examples comes from the active profile (100 by default; load a bigger one for a long run)
FUZZ = settings(deadline=3000, suppress_health_check=[HealthCheck.too_slow])


def _names(t: T, out: set[str]) -> set[str]:
    for name, f in t.fields.items():
        out.add(name)
        if f.t.item is not None:
            _names(f.t.item, out)
        _names(f.t, out)
    return out


NAMES = sorted(_names(SCHEMA, set())) + ["bogus", "Path", "ignitionVersion"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70000), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["/etc/a", "/etc/a/b", "/var/x", "/usr/x", "/etc/../x", "", "/", "core", "root", "etcd",
                     "nosuch", "sudo", "a.service", "a@.service", "a@b.service", "x.conf", "data:,hi",
                     "data:;base64,aGk=", "data:,", "gzip", "sha512-00", "http://127.0.0.1:9/x", "3.4.0", "3.0.0",
                     "[Unit]\nA=b\n[Install]\nWantedBy=multi-user.target\n", "[Service\n", "../x", "/dev/null"]),
    st.text(max_size=12),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(NAMES), inner, max_size=4)), max_leaves=20)


def _opt(**fields: st.SearchStrategy) -> st.SearchStrategy:
    return st.fixed_dictionaries({}, optional=fields)


PATHS = st.sampled_from(["/etc/a", "/etc/a/b", "/etc/hostname", "/etc/passwd", "/opt/x", "/var/lib/d", "/home",
                         "/etc/systemd/system/a.service", "/etc/shadow"])
OWNER = _opt(id=st.sampled_from([0, 1000, 998]), name=st.sampled_from(["core", "root", "etcd", "nosuch"]))
CONTENTS = _opt(source=st.sampled_from(["data:,x", "data:;base64,eA==", "", "data:,%1f%8b"]),
                compression=st.sampled_from(["gzip", ""]))
NODE = dict(path=PATHS, overwrite=st.booleans(), user=OWNER, group=OWNER)
SHAPED = _opt(
    storage=_opt(
        files=st.lists(_opt(**NODE, contents=CONTENTS, mode=st.sampled_from([420, 493, 384, 2541, 4096]),
                            append=st.lists(CONTENTS, max_size=2)), max_size=3),
        directories=st.lists(_opt(**NODE, mode=st.sampled_from([493, 448, 1023])), max_size=2),
        links=st.lists(_opt(**NODE, target=PATHS, hard=st.booleans()), max_size=2)),
    systemd=_opt(units=st.lists(_opt(
        name=st.sampled_from(["a.service", "sshd.service", "etcd.service", "nosuch.service", "t@.service",
                              "t@x.service"]),
        enabled=st.booleans(), mask=st.booleans(),
        contents=st.sampled_from(["[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n", ""]),
        dropins=st.lists(_opt(name=st.sampled_from(["a.conf", "b.conf"]), contents=st.just("[Unit]\n")),
                         max_size=2)), max_size=3)),
    passwd=_opt(
        users=st.lists(_opt(name=st.sampled_from(["core", "alice", "etcd", "root", "docker"]),
                            uid=st.sampled_from([1000, 1001, 998]), groups=st.lists(st.sampled_from(
                                ["sudo", "docker", "nosuch"]), max_size=2), primaryGroup=st.sampled_from(
                                ["users", "nosuch"]), shouldExist=st.booleans(), system=st.booleans(),
                            noCreateHome=st.booleans(), sshAuthorizedKeys=st.lists(st.just("ssh-ed25519 AAAA"),
                                                                                  max_size=1)), max_size=3),
        groups=st.lists(_opt(name=st.sampled_from(["ops", "docker", "etcd"]), gid=st.sampled_from([27, 3000]),
                             shouldExist=st.booleans()), max_size=2)),
)


def _check_apply(raw: bytes, *, files_dir: Path | None = None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ign-fuzz."))
    try:
        root = make_root(tmp / "root")
        (tmp / "outside").mkdir()
        before = tree(root, skip_marker=False)
        try:
            ignition.apply(raw, root, files_dir=files_dir)
        except ObeliskError as exc:
            assert str(exc) and "\n" not in str(exc)
            assert tree(root, skip_marker=False) == before, "a failed apply changed the root"
        assert list((tmp / "outside").iterdir()) == []
        assert sorted(p.name for p in tmp.iterdir()) == ["outside", "root"]
    finally:
        shutil.rmtree(tmp)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(raw: bytes) -> None:
    rep = ignition.validate(raw)
    assert rep.kind in ("ignition", "butane", "invalid")
    for e in rep.entries:
        assert e.line >= 1 and e.column >= 1 and e.level in ("error", "warning") and "\n" not in e.message
    _check_apply(raw)


@FUZZ
@given(st.one_of(VALUES, st.dictionaries(st.sampled_from(NAMES), VALUES, max_size=5)),
       st.sampled_from([*SPECS, "2.3.0", "9"]))
def test_random_json_shaped_like_ignition(doc: Any, version: str) -> None:
    if isinstance(doc, dict):
        doc = {"ignition": {"version": version}, **doc}
    raw = json.dumps(doc, indent=1).encode()
    ignition.validate(raw)
    _check_apply(raw)


@FUZZ
@given(SHAPED, st.sampled_from(list(SPECS)))
def test_near_valid_configs_apply_or_refuse_cleanly(cfg: dict, version: str) -> None:
    _check_apply(json.dumps({"ignition": {"version": version}, **cfg}).encode())


def _to_butane(v: Any) -> Any:
    if isinstance(v, dict):
        return {snake(k): _to_butane(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_to_butane(x) for x in v]
    return v


@FUZZ
@given(SHAPED, st.sampled_from([("flatcar", "1.0.0"), ("flatcar", "1.1.0"), ("fcos", "1.0.0"), ("fcos", "1.5.0")]))
def test_random_butane(cfg: dict, variant: tuple[str, str]) -> None:
    text = yaml.safe_dump({"variant": variant[0], "version": variant[1], **_to_butane(cfg)})
    rep = ignition.validate(text.encode())
    assert rep.kind == "butane"
    _check_apply(text.encode())


@FUZZ
@given(st.text(alphabet="variont:12.0\n -[]{}&*!|>'\"#%@`,?", max_size=120))
def test_random_yaml_text(text: str) -> None:
    try:
        read_yaml(text)
    except ReadError as exc:
        assert exc.line >= 1
    ignition.validate(text.encode())


JSONS = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8),
                               st.floats(allow_nan=False, allow_infinity=False)),
                     lambda inner: st.one_of(st.lists(inner, max_size=4),
                                             st.dictionaries(st.text(max_size=5), inner, max_size=4)),
                     max_leaves=30)


@FUZZ
@given(JSONS, st.sampled_from([None, 0, 2]))
def test_json_reader_agrees_with_json_and_marks_point_at_values(value: Any, indent: int | None) -> None:
    text = json.dumps(value, indent=indent)
    doc = read_json(text)
    assert doc.value == value
    lines = text.split("\n")
    for ptr, (line, col) in doc.marks.items():
        first = lines[line - 1][col - 1]
        assert first in '{["-0123456789tfn', (ptr, first)


@FUZZ
@given(st.text(alphabet='{}[]":,0123456789.eE-+ tfrunlasx\\\n', max_size=60))
def test_json_reader_on_random_text(text: str) -> None:
    try:
        ours = read_json(text).value
    except ReadError as exc:
        assert exc.line >= 1 and exc.column >= 1
        return
    assert ours == json.loads(text)


def _prune(v: Any) -> Any:
    """Empty objects and lists are the same as absent ones (Go's zero values)."""
    if isinstance(v, dict):
        return {k: p for k, x in v.items() if (p := _prune(x)) not in ({}, [], None)}
    if isinstance(v, list):
        return [_prune(x) for x in v]
    return v


def _valid(doc: dict) -> dict | None:
    rep = ignition.validate(json.dumps({"ignition": {"version": "3.4.0"}, **doc}).encode())
    return rep.value if rep.ok else None


@FUZZ
@given(SHAPED, SHAPED)
def test_merge_never_fails_keeps_keys_unique_and_has_an_identity(a: dict, b: dict) -> None:
    pa, pb = _valid(a), _valid(b)
    if pa is None or pb is None:
        return
    out = merge(pa, pb)
    dups: list[str] = []
    Checker(lambda ptr, level, msg: dups.append(msg) if "duplicate" in msg else None, SPECS["3.4.0"]).duplicates(
        out, SCHEMA, "")
    assert dups == []
    empty = {"ignition": {"version": "3.4.0"}}
    assert _prune(merge(pa, empty)) == _prune(pa) and _prune(merge(empty, pb)) == _prune(pb)
    json.dumps(out)
