"""Image definition (TOML) -> typed model, with errors that name the file, the key and the problem."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from obelisk.errors import ObeliskError

MIB = 1024 * 1024
# Used when neither SOURCE_DATE_EPOCH nor the definition pins a time (2024-01-01T00:00:00Z): a fixed
# default keeps rebuilds cacheable and reproducible; FAT cannot store times before 1980.
DEFAULT_EPOCH = 1704067200
DEFAULT_APP_ID = "{7b4a2b3c-5d0e-4f51-9d3a-0b5e1c0de001}"


class DefinitionError(ObeliskError, ValueError):
    """A definition is unreadable or invalid; ``str()`` is one line naming file, key and problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DebianSource(_Strict):
    """A Debian system assembled by mmdebstrap (--variant=minbase)."""

    kind: Literal["debian"]
    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    components: list[str] = ["main"]
    # More apt sources, as one-line "deb URL SUITE COMPONENTS" entries (security and updates, say).
    extra_sources: list[str] = []
    packages: list[str] = []
    install_obelisk: bool = True  # obelisk's host side under /usr/lib/obelisk/python


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
    busybox_package: str = "busybox-static"


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
    tag: str | None = None  # org.opencontainers.image.ref.name; default: the only manifest


Source = Annotated[
    DebianSource | TinySource | DirectorySource | TarballSource | OciSource, Field(discriminator="kind")
]


class Kernel(_Strict):
    # For tiny/directory/tarball/oci sources: fetch this Debian package (kernel + modules) when the
    # tree has no /usr/lib/modules/<kver>/vmlinuz of its own.
    package: str = "linux-image-amd64"
    # Keep only these modules (and what they depend on). Empty list: keep every module.
    modules: list[str] = []
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


class ImageDefinition(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str = Field("0.1.0", pattern=r"^[0-9]+(\.[0-9]+)*([-+][0-9A-Za-z.+-]*)?$")
    app_id: str = DEFAULT_APP_ID
    arch: Literal["amd64"] = "amd64"
    pretty_name: str | None = None
    source_date_epoch: int | None = Field(None, ge=315532800)  # >= 1980 (FAT)
    formats: list[Literal["raw", "qcow2", "pxe"]] = ["raw"]
    # Extra public keys (.pub files, relative to the definition) the image trusts, for key rotation.
    # When set, the signing key must be one of them.
    trusted_keys: list[Path] = []
    # Extra overlay directories (relative to the definition), applied after images/files/{common,<name>}.
    files: list[Path] = []
    source: Source
    kernel: Kernel = Kernel()
    disk: Disk = Disk()

    @field_validator("app_id")
    @classmethod
    def _app_id(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
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
    return f"{msg} (got {err.get('input')!r})" if kind not in ("value_error",) and "input" in err else msg


def load(path: Path) -> ImageDefinition:
    """Read and validate one definition; relative paths inside it are made absolute."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise DefinitionError(f"{path}: no such image definition (try images/base.toml or images/tiny.toml)") from None
    except OSError as exc:
        raise DefinitionError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise DefinitionError(f"{path}: not valid TOML: {exc}") from None
    try:
        model = ImageDefinition.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
            first = {**first, "loc": (*first["loc"], "kind")}
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise DefinitionError(f"{path}: {_loc(first['loc'])}: {_message(first)}{more}") from None
    base = path.resolve().parent

    def absolute(p: Path) -> Path:
        return p if p.is_absolute() else (base / p).resolve()

    update: dict[str, object] = {
        "trusted_keys": [absolute(p) for p in model.trusted_keys],
        "files": [absolute(p) for p in model.files],
    }
    src = model.source
    if isinstance(src, DirectorySource | TarballSource | OciSource):
        full = absolute(src.path)
        if not full.exists():
            raise DefinitionError(f"{path}: source.path: {full} does not exist")
        update["source"] = src.model_copy(update={"path": full})
    for key in update["trusted_keys"]:  # type: ignore[union-attr]
        if not Path(key).is_file():
            raise DefinitionError(f"{path}: trusted_keys: {key} does not exist")
    return model.model_copy(update=update)


def source_date_epoch(defn: ImageDefinition) -> int:
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        try:
            return int(env)
        except ValueError:
            raise DefinitionError(f"SOURCE_DATE_EPOCH={env!r} is not an integer number of seconds") from None
    return defn.source_date_epoch if defn.source_date_epoch is not None else DEFAULT_EPOCH
