"""Payload format: determinism, round trip, and every way a payload can be wrong."""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from obelisk import signing
from update_engine import payload
from update_engine.payload import PayloadError

APPID = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("keys")
    signing.generate_keypair(d / "good")
    signing.generate_keypair(d / "evil")
    return (signing.load_private_key(d / "good/obelisk.key"), signing.load_public_key(d / "good/obelisk.pub"),
            signing.load_private_key(d / "evil/obelisk.key"))


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, keys):
    d = tmp_path_factory.mktemp("payload")
    usr = d / "usr.img"
    usr.write_bytes(os.urandom(payload.CHUNK_SIZE * 2 + 4096 * 5))
    out = d / "update.payload"
    m = payload.write_payload(usr, out, app_id=APPID, arch="amd64", version="1.2.3",
                              verity_root_hash="ab" * 32, hash_offset=4096 * 4, private_key=keys[0])
    return usr, out, m


def test_deterministic_and_round_trip(made, keys, tmp_path: Path) -> None:
    usr, out, m = made
    again = tmp_path / "again.payload"
    payload.write_payload(usr, again, app_id=APPID, arch="amd64", version="1.2.3",
                          verity_root_hash="AB" * 32, hash_offset=4096 * 4, private_key=keys[0])
    assert again.read_bytes() == out.read_bytes()
    r = payload.read_manifest(out, [keys[1]])
    assert r == m and r.signed_by == keys[1].key_id
    assert r.target_size == usr.stat().st_size and r.payload_size == out.stat().st_size
    assert len(r.operations[0].chunk_sha256) == 3
    assert out.read_bytes()[r.data_offset:] == usr.read_bytes()


def _mutated(src: Path, dst: Path, fn) -> Path:
    b = bytearray(src.read_bytes())
    fn(b)
    dst.write_bytes(bytes(b))
    return dst


def test_rejects(made, keys, tmp_path: Path) -> None:
    _, out, m = made
    pub = [keys[1]]
    cases = {
        "bad magic": lambda b: b.__setitem__(0, ord("X")),
        "format": lambda b: b.__setitem__(slice(8, 12), struct.pack(">I", 9)),
        "manifest bit": lambda b: b.__setitem__(40, b[40] ^ 1),
        "signature bit": lambda b: b.__setitem__(m.data_offset - 3, b[m.data_offset - 3] ^ 0x10),
        "truncated": lambda b: b.__delitem__(slice(len(b) - 100, len(b))),
        "oversized": lambda b: b.extend(b"x" * 10),
        "huge manifest length": lambda b: b.__setitem__(slice(12, 16), struct.pack(">I", 1 << 31)),
    }
    msgs = {}
    for name, fn in cases.items():
        with pytest.raises(PayloadError) as ei:
            payload.read_manifest(_mutated(out, tmp_path / name.replace(" ", "_"), fn), pub)
        msgs[name] = str(ei.value)
    assert "magic" in msgs["bad magic"] and "signature" in msgs["manifest bit"]
    assert "truncated" in msgs["truncated"] and "more than" in msgs["oversized"]
    with pytest.raises(PayloadError, match="not made by any trusted key"):
        payload.read_manifest(out, [signing.public_key_of(keys[2])])
    with pytest.raises(PayloadError, match="no trusted public keys"):
        payload.read_manifest(out, [])


def test_resigned_bad_manifest_is_refused(keys) -> None:
    """A correctly signed but inconsistent manifest is refused by shape checks, not trusted blindly."""
    good = payload.Manifest(APPID, "amd64", "1.0", 8192, "0" * 64, "a" * 64, 4096,
                            (payload.Operation("replace", payload.Extent(0, 4096), 0, 4096, (), ("1" * 64,)),))
    blob = payload.canonical_json(good.to_json())
    head = payload.HEADER.pack(payload.MAGIC, 1, len(blob), 64, 0)
    with pytest.raises(PayloadError, match="cover 4096 bytes"):
        payload.verify_signed(head, blob, signing.sign(keys[0], head + blob), [keys[1]])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600), cut=st.integers(0, 2000), flip=st.integers(0, 4000))
def test_fuzz_parser_never_crashes(made, keys, data: bytes, cut: int, flip: int) -> None:
    _, out, _ = made
    head = out.read_bytes()[:2000]
    candidates = [data, head[:cut] + data, bytearray(head)]
    if flip < len(head) * 8:
        candidates[2][flip // 8] ^= 1 << (flip % 8)
    for c in candidates:
        buf = memoryview(bytes(c))
        pos = [0]

        def read(n: int, buf=buf, pos=pos) -> bytes:
            chunk = bytes(buf[pos[0]:pos[0] + n])
            pos[0] += len(chunk)
            return chunk
        with contextlib.suppress(PayloadError):
            payload.read_manifest_stream(read, [keys[1]])


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=6),
                    max_leaves=30))
def test_fuzz_manifest_json_never_crashes(obj) -> None:
    import json
    for blob in (json.dumps(obj).encode(), json.dumps({"format": 1, "x": obj}).encode()):
        with contextlib.suppress(PayloadError):
            payload.parse_manifest_json(blob)


_leaf = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=70)
         | st.lists(st.integers(), max_size=3))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path_pick=st.integers(0, 10_000), value=_leaf, drop=st.booleans())
def test_fuzz_manifest_fields_never_crash(made, path_pick: int, value, drop: bool) -> None:
    """Mutate one field of a valid manifest (deep inside too): a PayloadError or a valid manifest, nothing else."""
    import json
    obj = json.loads(payload.canonical_json(made[2].to_json()))
    paths = []

    def walk(node, trail):
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append((*trail, k))
                walk(v, (*trail, k))
        elif isinstance(node, list):
            for i, v in enumerate(node[:3]):
                paths.append((*trail, i))
                walk(v, (*trail, i))
    walk(obj, ())
    path = paths[path_pick % len(paths)]
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    if drop and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    with contextlib.suppress(PayloadError):
        payload.parse_manifest_json(json.dumps(obj).encode())


def _signed(keys, obj: dict) -> tuple[bytes, bytes, bytes]:
    blob = payload.canonical_json(obj)
    head = payload.HEADER.pack(payload.MAGIC, 1, len(blob), 64, 0)
    return head, blob, signing.sign(keys[0], head + blob)


@pytest.mark.parametrize("edit, words", [
    (lambda o: o.update(chunk_size=1 << 40), "chunk_size 1099511627776 is not supported"),
    (lambda o: o.update(chunk_size=2 << 30), "chunk_size 2147483648 is not supported"),
    (lambda o: o.update(chunk_size=payload.MAX_CHUNK_SIZE + 4096), "from 4096 to 16777216 bytes"),
    (lambda o: o.update(chunk_size=2048), "multiple of 4096"),
    (lambda o: o.update(chunk_size=-4096), "out of range"),
    (lambda o: o.update(block_size=512), "block_size 512"),
    (lambda o: (o["target"].update(size=0), o.update(operations=[
        {"type": "replace", "dst": {"offset": 0, "length": 0}, "data_offset": 0, "data_length": 0,
         "chunk_sha256": []}]), o["verity"].update(hash_offset=0)), "target size is 0"),
])
def test_signed_manifests_with_unusable_sizes_refused(made, keys, edit, words) -> None:
    """Signed by the trusted key and still refused, with one line naming the field (not a MemoryError)."""
    import json
    obj = json.loads(payload.canonical_json(made[2].to_json()))
    edit(obj)
    with pytest.raises(PayloadError, match=words):
        payload.verify_signed(*_signed(keys, obj), [keys[1]])


def test_signed_manifest_with_empty_and_several_operations_parses(made, keys) -> None:
    import json
    obj = json.loads(payload.canonical_json(made[2].to_json()))
    op = obj["operations"][0]
    first = payload.CHUNK_SIZE
    obj["operations"] = [
        {"type": "replace", "dst": {"offset": 0, "length": 0}, "data_offset": 0, "data_length": 0, "chunk_sha256": []},
        {**op, "dst": {"offset": 0, "length": first}, "data_length": first, "chunk_sha256": op["chunk_sha256"][:1]},
        {**op, "dst": {"offset": first, "length": op["data_length"] - first}, "data_offset": first,
         "data_length": op["data_length"] - first, "chunk_sha256": op["chunk_sha256"][1:]},
    ]
    m = payload.verify_signed(*_signed(keys, obj), [keys[1]])
    assert len(m.operations) == 3 and m.data_size == made[2].data_size


def test_signature_failures_have_their_own_class(made, keys, tmp_path: Path) -> None:
    """The daemon reports ERR_SIGNATURE by this class, no longer by looking for 'signature' in the message."""
    _, out, m = made
    bad = _mutated(out, tmp_path / "bad", lambda b: b.__setitem__(40, b[40] ^ 1))
    with pytest.raises(payload.PayloadSignatureError):
        payload.read_manifest(bad, [keys[1]])
    header = _mutated(out, tmp_path / "hdr", lambda b: b.__setitem__(slice(16, 20), struct.pack(">I", 65)))
    with pytest.raises(PayloadError) as ei:
        payload.read_manifest(header, [keys[1]])
    assert not isinstance(ei.value, payload.PayloadSignatureError)  # "signature length" in the text, not a signature
    from update_engine.errors import omaha_code
    from update_engine.omaha import ERR_PAYLOAD_VERIFICATION, ERR_SIGNATURE
    assert omaha_code(ei.value) == ERR_PAYLOAD_VERIFICATION
    assert omaha_code(payload.PayloadSignatureError("x")) == ERR_SIGNATURE
