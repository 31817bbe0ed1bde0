"""`obelisk image build`: check the inputs, run the stages, publish the release atomically."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from rich.console import Console

from builder import cache as stage_cache
from builder import definition, fsutil, pipeline
from builder.definition import DebianSource, TinySource
from builder.errors import BuildError
from builder.stages import release as release_stage
from obelisk import signing, tools
from obelisk.inputs import check_input
from obelisk.versions import is_version
from update_engine import payload

FORMATS = ("raw", "qcow2", "pxe")
DEFAULT_DEFINITION = Path("images/base.toml")


@dataclass
class BuildSummary:
    release_dir: Path
    stages: list[pipeline.StageResult]
    release: dict
    pruned: stage_cache.PruneResult | None = None  # what the cache cap removed after the build

    @property
    def all_cached(self) -> bool:
        return all(s.cached for s in self.stages)


def data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "obelisk"


def dev_key(console: Console) -> Path:
    """The development signing key, made once under the user's data directory."""
    where = data_dir() / "dev-key"
    priv = where / signing.PRIVATE_NAME
    if not priv.exists():
        signing.generate_keypair(where)
        console.print(f"[yellow]warning:[/] no --key given: made a development signing key at {priv}; "
                      "use 'obelisk key generate DIR' and --key for releases hosts should trust", soft_wrap=True)
    else:
        console.print(f"[yellow]warning:[/] no --key given: signing with the development key {priv}", soft_wrap=True)
    return priv


def parse_formats(text: str | None, default: list[str]) -> list[str]:
    if text is None:
        return list(default)
    items = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in items if f not in FORMATS]
    if bad or not items:
        raise BuildError(f"--format {text!r}: unknown format {', '.join(bad) or '(none)'}; choose from "
                         f"{', '.join(FORMATS)}")
    return sorted(set(items), key=FORMATS.index)


def needed_tools(defn: definition.ImageDefinition, formats: list[str]) -> list[str]:
    need = ["cp", "mksquashfs", "veritysetup", "mkfs.fat", "mcopy", "mkfs.ext4", "debugfs", "grub-mkimage", "depmod",
            "modinfo"]
    if isinstance(defn.source, DebianSource):
        need.append("mmdebstrap")
    if isinstance(defn.source, TinySource) or not isinstance(defn.source, DebianSource):
        need += ["apt-get", "apt-cache", "dpkg-deb"]
    if "qcow2" in formats:
        need.append("qemu-img")
    return need


def check_payload_fields(defn: definition.ImageDefinition, version: str, def_path: Path) -> None:
    """Refuse an app id, arch or version the update payload cannot carry now, not after seven stages:
    the payload's own writer is asked, on a one-block stand-in for usr.img."""
    with tempfile.NamedTemporaryFile(prefix="obelisk-preflight-") as f:
        f.write(bytes(4096))
        f.flush()
        try:
            payload.build_manifest(Path(f.name), app_id=defn.app_id, arch=defn.arch, version=version,
                                   verity_root_hash="0" * 64, hash_offset=4096)
        except payload.PayloadError as exc:
            raise BuildError(f"{def_path}: an update payload cannot carry this release ({exc}): change app_id or "
                             "the version") from None


def writable_dir(path: Path, what: str, option: str, *, create: bool) -> None:
    """Refuse up front a folder we could not make or write (``create``: make it now)."""
    probe = path
    while not probe.exists() and probe != probe.parent:  # the nearest folder that exists must let us make the rest
        probe = probe.parent
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BuildError(f"{what} {path}: cannot create it: {exc.strerror}: choose another with {option}") from None
        probe = path
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise BuildError(f"{what} {path}: {probe} is not a folder this user can write: choose another with {option}")


def _pem_of(pub: signing.PublicKey) -> bytes:
    return pub.key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def inputs_digest(defn: definition.ImageDefinition, version: str, epoch: int, keys: list[tuple[str, bytes]],
                  def_path: Path) -> str:
    """Digest of what the user controls: the definition, the version, the time, the keys, overlay files."""
    repo = pipeline.REPO
    overlays = [repo / "images/files/common", repo / "images/files" / defn.name, *defn.files]
    material = {
        "definition": defn.model_dump(mode="json"),
        "version": version,
        "epoch": epoch,
        "keys": [n for n, _ in keys],
        "overlays": [fsutil.digest_tree(p) for p in overlays],
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def build(def_path: Path, *, out: Path, version: str | None = None, key: Path | None = None,
          formats: str | None = None, cache: Path | None = None, console: Console | None = None,
          offline: bool = False, cache_max_size: int | None | str = "default") -> BuildSummary:
    """``cache_max_size``: bytes the stage cache may keep after the build (None: no cap; "default":
    $OBELISK_CACHE_MAX_SIZE or builder.cache.DEFAULT_MAX_SIZE). ``offline``: never ask the archive."""
    console = console or Console(stderr=True)
    cap = stage_cache.default_max_size() if cache_max_size == "default" else cache_max_size
    defn = definition.load(def_path)
    version = version or defn.version
    if not is_version(version):
        raise BuildError(f"--version {version!r}: use a dotted number with an optional suffix, e.g. 1.2.3 or 1.2.3-rc1")
    fmts = parse_formats(formats, list(defn.formats))
    epoch = definition.source_date_epoch(defn)
    check_payload_fields(defn, version, def_path)
    for tool in needed_tools(defn, fmts):  # every missing tool is reported before any work starts
        tools.require(tool)

    key_path = key if key is not None else dev_key(console)
    private = signing.load_private_key(check_input(key_path, "private key"))
    signer = signing.public_key_of(private)
    trusted: dict[str, bytes] = {}
    for p in defn.trusted_keys:
        pub = signing.load_public_key(p)
        trusted[f"{pub.key_id}.pub"] = _pem_of(pub)
    if trusted and f"{signer.key_id}.pub" not in trusted:
        raise BuildError(f"signing key {key_path} (id {signer.key_id}) is not one of the image's trusted_keys in "
                         f"{def_path}: hosts could not verify this release; sign with a trusted key or add its .pub")
    trusted.setdefault(f"{signer.key_id}.pub", _pem_of(signer))
    keys = sorted(trusted.items())

    digest = inputs_digest(defn, version, epoch, keys, def_path)
    # The build id names the OS content: it goes into /usr, so it must not change with disk sizes or
    # formats (that would rebuild /usr for a bigger ROOT partition).
    content = inputs_digest(defn.model_copy(update={"disk": definition.Disk(), "formats": ["raw"]}), version,
                            epoch, keys, def_path)
    build_id = f"{time.strftime('%Y%m%d', time.gmtime(epoch))}.{content[:8]}"
    ctx = pipeline.BuildContext(
        definition=defn, definition_path=def_path, version=version, build_id=build_id, epoch=epoch,
        formats=fmts, private_key=private, trusted_keys=keys, cache=(cache or pipeline.default_cache_dir()).resolve(),
        inputs_digest=digest, offline=offline,
    )
    writable_dir(ctx.cache, "stage cache", "--cache", create=True)
    writable_dir(out, "output folder", "--out", create=False)  # nothing is made there before the release
    console.print(f"building [bold]{defn.name}[/] {version} (build {build_id}) from {def_path}")
    stages = pipeline.run_all(ctx, console=console)
    files = release_stage.artifacts(ctx)
    rel = ctx["release"]
    for name in ("release.json", "packages.json", "SHA256SUMS", "SHA256SUMS.sig"):
        files[name] = rel.path(name)
    dest = out / defn.name / version
    pipeline.publish(files, dest)
    pruned = None
    if isinstance(cap, int):  # never an entry this build used: a warm rebuild right after stays warm
        pruned = stage_cache.prune(ctx.cache, cap, in_use=[s.dir for s in stages])
        if pruned.removed:
            console.print(f"cache: pruned {len(pruned.removed)} least recently used entries "
                          f"({stage_cache.human(pruned.before - pruned.after)}) to stay under "
                          f"{stage_cache.human(cap)}; now {stage_cache.human(pruned.after)}")
        if pruned.after > cap:
            console.print(f"[yellow]warning:[/] this build's own cache entries ({stage_cache.human(pruned.after)}) are "
                          f"more than the cache cap of {stage_cache.human(cap)}: raise it with --cache-max-size",
                          soft_wrap=True)
    return BuildSummary(dest, stages, json.loads(rel.path("release.json").read_text()), pruned)
