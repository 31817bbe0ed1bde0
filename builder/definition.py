"""Image definition (TOML) -> typed model, with errors that name the file, the key and the problem."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from obelisk.errors import ObeliskError
from obelisk.inputs import InputFileError, check_input
from obelisk.versions import is_version

MIB = 1024 * 1024
# Used when neither SOURCE_DATE_EPOCH nor the definition pins a time (2024-01-01T00:00:00Z): a fixed
# default keeps rebuilds cacheable and reproducible; FAT cannot store times before 1980.
DEFAULT_EPOCH = 1704067200
DEFAULT_APP_ID = "{7b4a2b3c-5d0e-4f51-9d3a-0b5e1c0de001}"
# Every value is checked with re.fullmatch (a "$" would let a trailing newline through).
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
# What an update payload's manifest and update.conf accept as an app id (a UUID in braces, usually).
APP_ID_RE = re.compile(r"[A-Za-z0-9{}._:-]{1,128}")
# Debian package, suite and component names (Debian policy 5.6.1); also keeps "-o..." options out of apt's argv.
DEB_NAME_RE = re.compile(r"[a-z0-9][a-z0-9+.-]*")
# The latest time a FAT file system and every tool in the chain can store (2099-12-31).
MAX_EPOCH = 4102358400
MAX_TOML_BYTES = 1 << 20  # a definition is a page of text


def _printable(v: str) -> str:
    """Refuse control characters (a newline in a value would start a new line of os-release, apt sources...)."""
    bad = next((c for c in v if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0), None)
    if bad is not None:
        raise ValueError(f"{v!r} holds the control character {bad!r}: use printable text")
    return v


def _deb_name(v: str) -> str:
    if not DEB_NAME_RE.fullmatch(v):
        raise ValueError(f"{v!r} is not a Debian package, suite or component name (lowercase letters, digits, + . -)")
    return v


def _module_name(v: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", v):
        raise ValueError(f"{v!r} is not a kernel module name (like virtio_blk)")
    return v


Text = Annotated[str, AfterValidator(_printable)]
DebName = Annotated[str, AfterValidator(_deb_name)]


class DefinitionError(ObeliskError, ValueError):
    """A definition is unreadable or invalid; ``str()`` is one line naming file, key and problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DebianSource(_Strict):
    """A Debian system assembled by mmdebstrap (--variant=minbase)."""

    kind: Literal["debian"]
    suite: DebName = "bookworm"
    mirror: Text = "http://deb.debian.org/debian"
    components: list[DebName] = ["main"]
    # More apt sources, as one-line "deb URL SUITE COMPONENTS" entries (security and updates, say).
    extra_sources: list[Text] = []
    packages: list[DebName] = []
    install_obelisk: bool = True  # obelisk's host side under /usr/lib/obelisk/python

    @field_validator("mirror")
    @classmethod
    def _mirror(cls, v: str) -> str:
        if not re.fullmatch(r"(https?|file)://\S+", v):
            raise ValueError(f"{v!r} is not an http://, https:// or file:// URL")
        return v

    @field_validator("extra_sources")
    @classmethod
    def _deb_lines(cls, v: list[str]) -> list[str]:
        for line in v:
            if not line.startswith("deb ") or len(line.split()) < 4:
                raise ValueError(f"{line!r} is not a 'deb URL SUITE COMPONENT...' line")
        return v


class TinySource(_Strict):
    """busybox-static plus the Debian kernel, each fetched with apt-get download."""

    kind: Literal["tiny"]
    busybox_package: DebName = "busybox-static"


class DirectorySource(_Strict):
    kind: Literal["directory"]
    path: Path


class TarballSource(_Strict):
    """A root filesystem tarball, e.g. from `docker export`."""

    kind: Literal["tarball"]
    path: Path


class OciSource(_Strict):
    """An OCI image layout directory (index.json + blobs/); layers are applied in order."""

    kind: Literal["oci"]
    path: Path
    tag: Text | None = None  # org.opencontainers.image.ref.name; default: the only manifest


Source = Annotated[
    DebianSource | TinySource | DirectorySource | TarballSource | OciSource, Field(discriminator="kind")
]


class Kernel(_Strict):
    # For tiny/directory/tarball/oci sources: fetch this Debian package (kernel + modules) when the
    # tree has no /usr/lib/modules/<kver>/vmlinuz of its own.
    package: DebName = "linux-image-amd64"
    # Keep only these modules (and what they depend on). Empty list: keep every module.
    modules: list[Annotated[str, AfterValidator(_module_name)]] = []
    # Drop these folders of /usr/lib/modules/<version>/ (e.g. "kernel/sound"): hardware a host never has.
    exclude: list[str] = []

    @field_validator("exclude")
    @classmethod
    def _relative(cls, v: list[str]) -> list[str]:
        for p in v:
            if p.startswith("/") or ".." in Path(p).parts:
                raise ValueError(f"{p!r} must be a path inside /usr/lib/modules/<version>/, like kernel/sound")
        return v


class Disk(_Strict):
    """Partition sizes in MiB (1 MiB aligned)."""

    esp_mib: int = Field(64, ge=33)  # FAT32 needs at least 65525 clusters
    usr_mib: int = Field(1024, ge=8)
    oem_mib: int = Field(16, ge=4)
    root_mib: int = Field(256, ge=8)
    size_mib: int | None = Field(None, ge=1)  # whole disk; default: the sum of the layout

    @model_validator(mode="after")
    def _fits(self) -> Disk:
        need = self.layout_mib()
        if self.size_mib is not None and self.size_mib < need:
            raise ValueError(
                f"disk.size_mib = {self.size_mib} is too small for the layout: it needs at least {need} MiB "
                "(ESP + 2 x USR + OEM + ROOT + 2 MiB for the GPT)"
            )
        return self

    def layout_mib(self) -> int:
        # 1 MiB before the first partition, 1 MiB at the end for the backup GPT.
        return 1 + self.esp_mib + 2 * self.usr_mib + self.oem_mib + self.root_mib + 1

    @property
    def total_bytes(self) -> int:
        return (self.size_mib or self.layout_mib()) * MIB


UNIT_RE = re.compile(r"[A-Za-z0-9@_.:-]+\.(service|socket|timer|path|target)")


def _unit_name(v: str) -> str:
    if not UNIT_RE.fullmatch(v):
        raise ValueError(f"{v!r} is not a systemd unit name, like ssh.service")
    return v


UnitName = Annotated[str, AfterValidator(_unit_name)]


class Units(_Strict):
    """Which units of the tree start at boot, decided in /usr (so a new /usr brings its choice along)."""

    # Enabled in /usr from the unit's own [Install] WantedBy= (e.g. ssh.service from openssh-server).
    enable: list[UnitName] = []
    # Installed but not started: the links package scripts made in /etc are removed (e.g. etcd.service,
    # which waits for cloud-config to configure it).
    disable: list[UnitName] = []

    @model_validator(mode="after")
    def _disjoint(self) -> Units:
        both = sorted(set(self.enable) & set(self.disable))
        if both:
            raise ValueError(f"{', '.join(both)} cannot be in both units.enable and units.disable")
        return self


class ImageDefinition(_Strict):
    name: str
    version: str = "0.1.0"
    app_id: str = DEFAULT_APP_ID
    arch: Literal["amd64"] = "amd64"
    pretty_name: Annotated[str, Field(max_length=200), AfterValidator(_printable)] | None = None
    source_date_epoch: int | None = Field(None, ge=315532800, le=MAX_EPOCH)  # >= 1980 (FAT)
    formats: list[Literal["raw", "qcow2", "pxe"]] = ["raw"]
    # Extra public keys (.pub files, relative to the definition) the image trusts, for key rotation.
    # When set, the signing key must be one of them.
    trusted_keys: list[Path] = []
    # Extra overlay directories (relative to the definition), applied after images/files/{common,<name>}.
    files: list[Path] = []
    source: Source
    kernel: Kernel = Kernel()
    disk: Disk = Disk()
    units: Units = Units()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not an image name: lowercase letters, digits, . _ - (like base or tiny)")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not is_version(v):
            raise ValueError(f"{v!r} is not a version: a dotted number with an optional suffix, like 1.2.3 or "
                             "1.2.3-rc1")
        return v

    @field_validator("app_id")
    @classmethod
    def _app_id(cls, v: str) -> str:
        if not APP_ID_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not an app id: a UUID in braces, or up to 128 letters, digits and {{}} . _ : -")
        return v


def _loc(loc: tuple[object, ...]) -> str:
    # Drop pydantic's discriminator tags (e.g. "debian") so the key reads as in the TOML file.
    parts = [str(p) for p in loc if p not in ("debian", "tiny", "directory", "tarball", "oci")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "(top level)"


def _message(err: dict) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_invalid":
        tag = err.get("ctx", {}).get("tag")
        return f"unknown source kind {tag!r} (expected debian, tiny, directory, tarball or oci)"
    if kind == "union_tag_not_found":
        return "missing 'kind' (debian, tiny, directory, tarball or oci)"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind == "value_error" or "input" not in err:
        return msg
    got = repr(err["input"])
    return f"{msg} (got {got[:60] + '...' if len(got) > 60 else got})"


def _read(path: Path) -> dict:
    try:
        check_input(path, "TOML image definition")
    except InputFileError as exc:
        if not path.exists():
            raise DefinitionError(f"{path}: no such image definition (try images/base.toml or "
                                  "images/tiny.toml)") from None
        raise DefinitionError(str(exc)) from None
    if path.stat().st_size > MAX_TOML_BYTES:
        raise DefinitionError(f"{path}: {path.stat().st_size} bytes is too big for an image definition "
                              f"(at most {MAX_TOML_BYTES}): is it the right file?")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DefinitionError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise DefinitionError(f"{path}: not UTF-8 text (byte {exc.start}): an image definition is TOML") from None
    except tomllib.TOMLDecodeError as exc:
        raise DefinitionError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise DefinitionError(f"{path}: not valid TOML: tables or arrays nested too deeply") from None


def load(path: Path) -> ImageDefinition:
    """Read and validate one definition; relative paths inside it are made absolute, and the files and
    folders it names are checked here, before any build work starts."""
    raw = _read(path)
    try:
        model = ImageDefinition.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
            first = {**first, "loc": (*first["loc"], "kind")}
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise DefinitionError(f"{path}: {_loc(first['loc'])}: {_message(first)}{more}") from None
    except RecursionError:
        raise DefinitionError(f"{path}: values nested too deeply for an image definition") from None
    base = path.resolve().parent

    def absolute(p: Path) -> Path:
        return p if p.is_absolute() else (base / p).resolve()

    keys = [absolute(p) for p in model.trusted_keys]
    files = [absolute(p) for p in model.files]
    update: dict[str, object] = {"trusted_keys": keys, "files": files}
    src = model.source
    if isinstance(src, DirectorySource | TarballSource | OciSource):
        full = absolute(src.path)
        if not full.exists():
            raise DefinitionError(f"{path}: source.path: {full} does not exist")
        if isinstance(src, TarballSource):
            _check_file(path, "source.path", full, "tarball")
        elif not full.is_dir():
            raise DefinitionError(f"{path}: source.path: {full} is not a folder: a {src.kind} source is a folder")
        update["source"] = src.model_copy(update={"path": full})
    for key in keys:
        _check_file(path, "trusted_keys", key, "public key")
    for folder in files:
        if not folder.is_dir():
            raise DefinitionError(f"{path}: files: {folder} is not a folder: each entry is an overlay folder")
    return model.model_copy(update=update)


def _check_file(defn: Path, key: str, p: Path, what: str) -> None:
    try:
        check_input(p, what)
    except InputFileError as exc:
        raise DefinitionError(f"{defn}: {key}: {exc}") from None


def source_date_epoch(defn: ImageDefinition) -> int:
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        try:
            value = int(env)
        except ValueError:
            raise DefinitionError(f"SOURCE_DATE_EPOCH={env!r} is not an integer number of seconds") from None
        if not 315532800 <= value <= MAX_EPOCH:
            raise DefinitionError(f"SOURCE_DATE_EPOCH={env}: use a time from 1980 to 2099 (FAT stores no other)")
        return value
    return defn.source_date_epoch if defn.source_date_epoch is not None else DEFAULT_EPOCH
