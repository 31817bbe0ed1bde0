"""The update payload: a fixed header, an Ed25519-signed manifest, then data (docs/payload.md).

The manifest binds app id, arch, version, target size and SHA-256, verity root hash and the
operations that rebuild the target, so a host can check all of it before a byte reaches the
disk. The same inputs always give the same bytes (canonical JSON, deterministic Ed25519).

Layout (all integers big-endian)::

    0   8  magic b"OBKPAYLD"
    8   4  format version (1)
    12  4  manifest length M
    16  4  signature length S (64)
    20  4  reserved, 0
    24  M  manifest: canonical JSON (UTF-8, sorted keys, no spaces)
    ... S  Ed25519 signature over header[0:24] + manifest
    ... *  data: the blobs the operations name, at data_offset = 24 + M + S
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from obelisk import signing
from obelisk.errors import ObeliskError
from obelisk.signing import PublicKey, SigningError
from update_engine import chunks as cdc

MAGIC = b"OBKPAYLD"
FORMAT_VERSION = 1
HEADER = struct.Struct(">8sIIII")
HEADER_SIZE = HEADER.size  # 24
SIGNATURE_SIZE = 64
MAX_MANIFEST = 16 * 1024 * 1024  # refused before reading; at 4 MiB chunks this fits a ~900 GiB target
BLOCK_SIZE = 4096
CHUNK_SIZE = 4 * 1024 * 1024  # per-chunk SHA-256 lets a host stop at the first bad chunk
# A host holds a few chunks in memory while it streams (docs/payload.md), so the format bounds them;
# any multiple of BLOCK_SIZE in between is fine (nothing relies on a power of two).
MIN_CHUNK_SIZE = BLOCK_SIZE
MAX_CHUNK_SIZE = 16 * 1024 * 1024

OP_REPLACE = "replace"  # data blob -> dst extent
OP_SOURCE_COPY = "source_copy"  # reserved for deltas: copy src extents of the running slot (not yet applied)
KNOWN_OPS = (OP_REPLACE, OP_SOURCE_COPY)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX = re.compile(r"^[0-9a-f]+$")
_VERSION = re.compile(r"^[0-9]+(\.[0-9]+)*([-+][0-9A-Za-z.\-+]*)?$")
_TOKEN = re.compile(r"^[A-Za-z0-9{}._:\-]{1,128}$")


class PayloadError(ObeliskError, ValueError):
    """A payload is malformed, unsigned or for something else; one line for the user."""


class PayloadSignatureError(PayloadError):
    """The manifest is not signed by a trusted key (or the signature does not match it)."""


@dataclass(frozen=True)
class Extent:
    offset: int  # bytes, from the start of the partition
    length: int

    def to_json(self) -> dict:
        return {"offset": self.offset, "length": self.length}


@dataclass(frozen=True)
class Operation:
    type: str
    dst: Extent
    data_offset: int = 0  # relative to the data area
    data_length: int = 0
    src: tuple[Extent, ...] = ()
    chunk_sha256: tuple[str, ...] = ()  # SHA-256 of each CHUNK_SIZE piece of the data blob

    def to_json(self) -> dict:
        out: dict = {"type": self.type, "dst": self.dst.to_json()}
        if self.type == OP_REPLACE:
            out.update(data_offset=self.data_offset, data_length=self.data_length, chunk_sha256=list(self.chunk_sha256))
        if self.src:
            out["src"] = [e.to_json() for e in self.src]
        return out


@dataclass(frozen=True)
class ChunkIndex:
    """The target cut into content-defined chunks (``update_engine.chunks``), in order, covering it."""

    chunker: cdc.Chunker
    chunks: tuple[cdc.Chunk, ...]

    def to_json(self) -> dict:
        return {"chunker": self.chunker.to_json(), "chunks": [[c.length, c.sha256] for c in self.chunks]}


@dataclass(frozen=True)
class Manifest:
    app_id: str
    arch: str
    version: str
    target_size: int
    target_sha256: str
    verity_root_hash: str
    hash_offset: int
    operations: tuple[Operation, ...]
    chunk_size: int = CHUNK_SIZE
    block_size: int = BLOCK_SIZE
    index: ChunkIndex | None = None  # content-defined chunks of the target, for adaptive updates
    # The verity salt (hex) and uuid, so a host can rebuild the hash tree instead of fetching it (optional).
    verity_salt: str = ""
    verity_uuid: str = ""
    # Not part of the signed JSON: where this manifest was found and who signed it.
    data_offset: int = field(default=0, compare=False)
    data_size: int = field(default=0, compare=False)
    signed_by: str = field(default="", compare=False)
    raw: bytes = field(default=b"", compare=False, repr=False)  # header + manifest + signature

    @property
    def payload_size(self) -> int:
        return self.data_offset + self.data_size

    def to_json(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "app_id": self.app_id,
            "arch": self.arch,
            "version": self.version,
            "target": {"size": self.target_size, "sha256": self.target_sha256},
            "verity": {"root_hash": self.verity_root_hash, "hash_offset": self.hash_offset,
                       **({"salt": self.verity_salt, "uuid": self.verity_uuid} if self.verity_salt else {})},
            "block_size": self.block_size,
            "chunk_size": self.chunk_size,
            "operations": [op.to_json() for op in self.operations],
            **({"index": self.index.to_json()} if self.index is not None else {}),
        }

    def summary(self) -> dict:
        out = {**self.to_json(), "operations": len(self.operations), "signed_by": self.signed_by,
               "payload_size": self.payload_size}
        if self.index is not None:
            out["index"] = {"chunker": self.index.chunker.to_json(), "chunks": len(self.index.chunks)}
        return out

    def data_position(self, target_offset: int) -> int:
        """Where target byte ``target_offset`` sits in the payload file (every operation is a replace)."""
        for op in self.operations:
            if op.dst.offset <= target_offset < op.dst.offset + op.dst.length:
                return self.data_offset + op.data_offset + target_offset - op.dst.offset
        raise PayloadError(f"target offset {target_offset} is outside the manifest's operations")


def canonical_json(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# ---------------------------------------------------------------- parsing (never trusts input)


def _get(d: object, key: str, kind: type | tuple[type, ...], where: str = "manifest") -> object:
    if not isinstance(d, dict) or key not in d:
        raise PayloadError(f"{where}: missing key '{key}'")
    v = d[key]
    # bool is an int subclass; a JSON true must not pass as a size.
    if (kind is int and isinstance(v, bool)) or not isinstance(v, kind):
        raise PayloadError(f"{where}: key '{key}' has the wrong type ({type(v).__name__})")
    return v


def _nonneg(d: object, key: str, where: str) -> int:
    v = _get(d, key, int, where)
    assert isinstance(v, int)
    if v < 0 or v >= 1 << 62:
        raise PayloadError(f"{where}: key '{key}' out of range ({v})")
    return v


def _extent(d: object, where: str) -> Extent:
    return Extent(_nonneg(d, "offset", where), _nonneg(d, "length", where))


def _parse_op(d: object, i: int, chunk_size: int) -> Operation:
    where = f"manifest operation {i}"
    kind = _get(d, "type", str, where)
    if kind not in KNOWN_OPS:
        known = ", ".join(KNOWN_OPS)
        raise PayloadError(f"{where}: unknown type '{kind}' (this host knows {known}): update obelisk first")
    dst = _extent(_get(d, "dst", dict, where), where + " dst")
    assert isinstance(d, dict)
    if kind == OP_REPLACE:
        data_offset = _nonneg(d, "data_offset", where)
        data_length = _nonneg(d, "data_length", where)
        if data_length != dst.length:
            raise PayloadError(f"{where}: data_length {data_length} != dst length {dst.length}")
        chunks = _get(d, "chunk_sha256", list, where)
        assert isinstance(chunks, list)
        want = -(-data_length // chunk_size)
        if len(chunks) != want or not all(isinstance(c, str) and _HEX64.match(c) for c in chunks):
            raise PayloadError(f"{where}: chunk_sha256 must be {want} hex SHA-256 values")
        return Operation(kind, dst, data_offset, data_length, (), tuple(chunks))
    srcs = _get(d, "src", list, where)
    assert isinstance(srcs, list)
    src = tuple(_extent(s, where + " src") for s in srcs)
    return Operation(kind, dst, src=src)


def parse_manifest_json(blob: bytes) -> Manifest:
    """Manifest fields from the signed JSON, checked for shape and consistency."""
    try:
        obj = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PayloadError(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise PayloadError("manifest is not a JSON object")
    fmt = _get(obj, "format", int)
    if fmt != FORMAT_VERSION:
        raise PayloadError(f"manifest format {fmt} is not supported (this host reads {FORMAT_VERSION})")
    strs = {}
    for key in ("app_id", "arch", "version"):
        v = _get(obj, key, str)
        assert isinstance(v, str)
        if not _TOKEN.match(v):
            raise PayloadError(f"manifest: key '{key}' has invalid characters: {v[:40]!r}")
        strs[key] = v
    if not _VERSION.match(strs["version"]):
        raise PayloadError(f"manifest: version {strs['version']!r} is not numeric dotted (like 1.2.3)")
    target = _get(obj, "target", dict)
    size = _nonneg(target, "size", "manifest target")
    sha = _get(target, "sha256", str, "manifest target")
    verity = _get(obj, "verity", dict)
    root = _get(verity, "root_hash", str, "manifest verity")
    hoff = _nonneg(verity, "hash_offset", "manifest verity")
    if not isinstance(sha, str) or not _HEX64.match(sha):
        raise PayloadError("manifest: target sha256 is not 64 lower-case hex digits")
    if not isinstance(root, str) or not _HEX.match(root) or len(root) not in (40, 64, 128):
        raise PayloadError("manifest: verity root_hash is not a hex digest")
    block = _nonneg(obj, "block_size", "manifest")
    chunk = _nonneg(obj, "chunk_size", "manifest")
    if block != BLOCK_SIZE:
        raise PayloadError(f"manifest: block_size {block} is not supported (this host reads {BLOCK_SIZE})")
    if not MIN_CHUNK_SIZE <= chunk <= MAX_CHUNK_SIZE or chunk % block:
        raise PayloadError(f"manifest: chunk_size {chunk} is not supported: it must be a multiple of {block} "
                           f"from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes")
    if size == 0:
        raise PayloadError("manifest: target size is 0: a payload must stage a USR image")
    if hoff > size or hoff % block:
        raise PayloadError(f"manifest: hash_offset {hoff} is not a block boundary inside the target ({size})")
    ops_raw = _get(obj, "operations", list)
    assert isinstance(ops_raw, list)
    if not ops_raw or len(ops_raw) > 100_000:
        raise PayloadError("manifest: operations list is empty or too long")
    ops = tuple(_parse_op(o, i, chunk) for i, o in enumerate(ops_raw))
    covered = 0
    data_end = 0
    for i, op in enumerate(ops):
        if op.dst.offset != covered:
            raise PayloadError(f"manifest operation {i}: dst extents must be in order without gaps")
        covered = op.dst.offset + op.dst.length
        if op.type == OP_REPLACE:
            if op.data_offset != data_end:
                raise PayloadError(f"manifest operation {i}: data blobs must be in order without gaps")
            data_end = op.data_offset + op.data_length
    if covered != size:
        raise PayloadError(f"manifest: operations cover {covered} bytes, target size is {size}")
    index = _parse_index(obj["index"], size) if "index" in obj else None
    vsalt, vuuid = _verity_extra(verity)
    return Manifest(strs["app_id"], strs["arch"], strs["version"], size, sha, root, hoff, ops, chunk, block,
                    index, vsalt, vuuid, data_size=data_end)


def _verity_extra(verity: dict) -> tuple[str, str]:
    """The optional salt and uuid (both or neither); malformed ones are refused like any manifest field."""
    if "salt" not in verity and "uuid" not in verity:
        return "", ""
    salt = _get(verity, "salt", str, "manifest verity")
    vuuid = _get(verity, "uuid", str, "manifest verity")
    assert isinstance(salt, str) and isinstance(vuuid, str)
    if not _HEX.match(salt) or len(salt) % 2 or len(salt) > 512:
        raise PayloadError("manifest: verity salt is not hex of at most 256 bytes")
    try:
        vuuid = str(uuid.UUID(vuuid))
    except ValueError:
        raise PayloadError("manifest: verity uuid is not a UUID") from None
    return salt, vuuid


def _parse_index(d: object, size: int) -> ChunkIndex | None:
    """The chunk index; None when it was cut by a chunker this host does not know (the full payload then)."""
    where = "manifest index"
    chunker = _get(d, "chunker", dict, where)
    assert isinstance(chunker, dict)
    if chunker.get("kind") != cdc.KIND:
        return None
    try:
        ck = cdc.Chunker(_nonneg(chunker, "min", where), _nonneg(chunker, "avg", where), _nonneg(chunker, "max", where))
    except ValueError as exc:
        raise PayloadError(f"{where}: {exc}") from None
    raw = _get(d, "chunks", list, where)
    assert isinstance(raw, list)
    out: list[cdc.Chunk] = []
    pos = 0
    for i, c in enumerate(raw):
        if (not isinstance(c, list) or len(c) != 2 or not isinstance(c[0], int) or isinstance(c[0], bool)
                or not isinstance(c[1], str) or not _HEX64.match(c[1])):
            raise PayloadError(f"{where}: chunk {i} is not [length, sha256]")
        if not 0 < c[0] <= ck.max_size:
            raise PayloadError(f"{where}: chunk {i} has length {c[0]} (1 to {ck.max_size} bytes)")
        out.append(cdc.Chunk(pos, c[0], c[1]))
        pos += c[0]
    if pos != size:
        raise PayloadError(f"{where}: chunks cover {pos} bytes but the target is {size}: the index does not cover "
                           "the target (rebuild the payload)")
    return ChunkIndex(ck, tuple(out))


def parse_header(head: bytes) -> tuple[int, int]:
    """(manifest length, signature length) from the first HEADER_SIZE bytes."""
    if len(head) < HEADER_SIZE:
        raise PayloadError(f"payload is truncated: {len(head)} bytes, the header alone is {HEADER_SIZE}")
    magic, fmt, mlen, slen, reserved = HEADER.unpack(head[:HEADER_SIZE])
    if magic != MAGIC:
        raise PayloadError("not an obelisk update payload (bad magic): was it made by 'obelisk image build'?")
    if fmt != FORMAT_VERSION:
        raise PayloadError(f"payload format {fmt} is not supported (this host reads {FORMAT_VERSION}): update obelisk")
    if slen != SIGNATURE_SIZE or reserved != 0:
        raise PayloadError(f"payload header is corrupt (signature length {slen}, reserved {reserved})")
    if mlen == 0 or mlen > MAX_MANIFEST:
        raise PayloadError(f"payload header is corrupt (manifest length {mlen})")
    return mlen, slen


def verify_signed(head: bytes, manifest_blob: bytes, signature: bytes, trusted_keys: list[PublicKey]) -> Manifest:
    """Check the signature first, then the manifest's shape; return it with its location."""
    try:
        key = signing.verify_any(trusted_keys, head[:HEADER_SIZE] + manifest_blob, signature)
    except SigningError as exc:
        raise PayloadSignatureError(f"manifest signature: {exc}") from None
    m = parse_manifest_json(manifest_blob)
    data_offset = HEADER_SIZE + len(manifest_blob) + len(signature)
    return _with(m, data_offset=data_offset, signed_by=key.key_id, raw=head[:HEADER_SIZE] + manifest_blob + signature)


def _with(m: Manifest, **kw: object) -> Manifest:
    from dataclasses import replace

    return replace(m, **kw)


def read_manifest_stream(read: Callable[[int], bytes], trusted_keys: list[PublicKey]) -> Manifest:
    """Read header, manifest and signature through ``read(n)`` (exactly what they need, no more)."""
    head = _read_exact(read, HEADER_SIZE, "header")
    mlen, slen = parse_header(head)
    blob = _read_exact(read, mlen, "manifest")
    sig = _read_exact(read, slen, "signature")
    return verify_signed(head, blob, sig, trusted_keys)


def _read_exact(read: Callable[[int], bytes], n: int, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = read(n - len(buf))
        if not got:
            raise PayloadError(f"payload is truncated inside the {what} ({len(buf)} of {n} bytes)")
        buf += got
    return bytes(buf)


def read_manifest(path: Path, trusted_keys: list[PublicKey]) -> Manifest:
    """The verified manifest of a payload file; also checks the file holds all the data it announces."""
    try:
        with open(path, "rb") as f:
            m = read_manifest_stream(f.read, trusted_keys)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise PayloadError(f"cannot read payload {path}: {exc.strerror}") from None
    if size < m.payload_size:
        raise PayloadError(f"{path}: payload is truncated ({size} of {m.payload_size} bytes)")
    if size > m.payload_size:
        raise PayloadError(f"{path}: payload has {size - m.payload_size} bytes more than its manifest announces")
    return m


# ---------------------------------------------------------------- writing


def _hash_chunks(f: BinaryIO, size: int, chunk: int) -> tuple[str, list[str]]:
    whole = hashlib.sha256()
    chunks: list[str] = []
    left = size
    while left:
        piece = f.read(min(chunk, left))
        if not piece:
            raise PayloadError(f"USR image shrank while hashing ({size - left} of {size} bytes)")
        whole.update(piece)
        chunks.append(hashlib.sha256(piece).hexdigest())
        left -= len(piece)
    return whole.hexdigest(), chunks


DEFAULT_CHUNKER = cdc.Chunker()


def build_manifest(usr_image: Path, *, app_id: str, arch: str, version: str, verity_root_hash: str,
                   hash_offset: int, chunk_size: int = CHUNK_SIZE,
                   chunker: cdc.Chunker | None = DEFAULT_CHUNKER, verity_salt: str = "",
                   verity_uuid: str = "") -> Manifest:
    """``chunker`` None: no chunk index (the manifest old builders wrote)."""
    size = usr_image.stat().st_size
    if size == 0:
        raise PayloadError(f"{usr_image} is empty: build the USR image first")
    with open(usr_image, "rb") as f:
        sha, chunks = _hash_chunks(f, size, chunk_size)
    op = Operation(OP_REPLACE, Extent(0, size), 0, size, (), tuple(chunks))
    # Cut at hash_offset too, so every chunk of the verity area lies inside it (a host can rebuild those).
    index = (ChunkIndex(chunker, tuple(chunker.index_file(usr_image, size, split=hash_offset)))
             if chunker is not None else None)
    m = Manifest(app_id, arch, version, size, sha, verity_root_hash.lower(), hash_offset, (op,), chunk_size,
                 index=index, verity_salt=verity_salt.lower(), verity_uuid=verity_uuid)
    # Round-trip through the parser so a writer can never produce what a host would refuse.
    return _with(parse_manifest_json(canonical_json(m.to_json())), data_size=size)


def write_payload(usr_image: Path, out: Path, *, app_id: str, arch: str, version: str,
                  verity_root_hash: str, hash_offset: int, private_key: Ed25519PrivateKey,
                  chunk_size: int = CHUNK_SIZE, chunker: cdc.Chunker | None = DEFAULT_CHUNKER,
                  verity_salt: str = "", verity_uuid: str = "") -> Manifest:
    """Write ``out`` atomically: header, signed manifest, then the USR image as one replace blob.

    The data area is the target in order, so each chunk of the index is one Range request away
    (``Manifest.data_position``)."""
    m = build_manifest(usr_image, app_id=app_id, arch=arch, version=version,
                       verity_root_hash=verity_root_hash, hash_offset=hash_offset, chunk_size=chunk_size,
                       chunker=chunker, verity_salt=verity_salt, verity_uuid=verity_uuid)
    blob = canonical_json(m.to_json())
    head = HEADER.pack(MAGIC, FORMAT_VERSION, len(blob), SIGNATURE_SIZE, 0)
    sig = signing.sign(private_key, head + blob)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as dst, open(usr_image, "rb") as src:
            dst.write(head + blob + sig)
            left = m.target_size
            while left:
                piece = src.read(min(8 << 20, left))
                if not piece:
                    raise PayloadError(f"{usr_image} shrank while writing the payload")
                dst.write(piece)
                left -= len(piece)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    key = signing.public_key_of(private_key)
    return _with(m, data_offset=len(head) + len(blob) + len(sig), signed_by=key.key_id, raw=head + blob + sig)
