"""Butane YAML (variant fcos 1.0.0-1.5.0, flatcar 1.0.0-1.1.0) read directly, translated to Ignition.

The versions map to the Ignition specs the real Butane (coreos/butane config/config.go) maps them
to: fcos 1.0.0 -> 3.0.0, 1.1.0 -> 3.1.0, 1.2.0 and 1.3.0 -> 3.2.0, 1.4.0 -> 3.3.0, 1.5.0 -> 3.4.0;
flatcar 1.0.0 -> 3.3.0, 1.1.0 -> 3.4.0. Field names are Ignition's in snake_case, plus Butane's
sugar: ``inline``/``local`` contents (made into data: URLs, gzipped when that is smaller, as
Butane's MakeDataURL does), ``storage.trees`` and ``contents_local``/``ssh_authorized_keys_local``
read relative to the files dir. Local paths may not leave the files dir (symlinks included).
fcos ``boot_device`` and ``grub`` are refused: they partition the disk and change the boot entries.
"""

from __future__ import annotations

import gzip
import os
import re
import stat
import urllib.parse
from base64 import b64encode
from pathlib import Path
from typing import Any

from cloudconfig.ignition.fetch import MAX_RESOURCE
from cloudconfig.ignition.reader import Raw, join
from cloudconfig.ignition.spec import NO_GRUB, NO_PARTITIONING, T, Version, build, vtext
from obelisk.errors import ObeliskError
from obelisk.inputs import check_input

VARIANTS: dict[str, dict[str, Version]] = {
    "fcos": {"1.0.0": (3, 0), "1.1.0": (3, 1), "1.2.0": (3, 2), "1.3.0": (3, 2), "1.4.0": (3, 3), "1.5.0": (3, 4)},
    "flatcar": {"1.0.0": (3, 3), "1.1.0": (3, 4)},
}
BUTANE_SCHEMA = build(butane=True)
_SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?")
_OVERRIDES = {"sizeMiB": "size_mib", "startMiB": "start_mib"}
FCOS_ONLY = {"boot_device": ("1.3.0", f"boot_device: {NO_PARTITIONING}"),
             "grub": ("1.5.0", f"grub: {NO_GRUB}")}
NO_FILES_DIR = "local file paths are relative to a files directory that must be specified (--files-dir)"
ESCAPE = "local file path traverses outside the files directory"


def snake(name: str) -> str:
    return _OVERRIDES.get(name) or re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def supported() -> str:
    return "; ".join(f"{v} {', '.join(vs)}" for v, vs in VARIANTS.items())


def since_text(variant: str) -> Any:
    def text(v: Version) -> str:
        first = next((bv for bv, spec in VARIANTS[variant].items() if spec >= v), None)
        return f"{variant} {first}" if first else f"a later {variant} version"
    return text


def header(doc: dict[str, Any]) -> tuple[str | None, str | None, str | None, Version | None]:
    """(variant, version, problem, spec): problem names what is wrong with variant/version."""
    var, ver = doc.get("variant"), doc.get("version")
    var_s = var.text if isinstance(var, Raw) else None
    ver_s = ver.text if isinstance(ver, Raw) else None
    if not var_s:
        return None, ver_s, "error parsing variant; must be specified (variant: flatcar or fcos)", None
    if not ver_s or not _SEMVER.fullmatch(ver_s):
        return var_s, ver_s, "error parsing version; must be a valid semver (version: 1.1.0)", None
    spec = VARIANTS.get(var_s, {}).get(ver_s)
    if spec is None:
        return var_s, ver_s, (f"No translator exists for variant {var_s} with version {ver_s}: obelisk reads "
                              f"Butane {supported()}; translate others to Ignition 3.4.0 or older with butane"), None
    return var_s, ver_s, None, spec


def make_data_url(contents: bytes, compression: str | None, allow_compression: bool = True) -> tuple[str, str | None]:
    """Butane's MakeDataURL: the smallest of percent-escaped, base64 and gzip+base64.

    The compression returned is "" (explicit, so a merged child does not inherit a parent's gzip),
    "gzip", or None when the user set compression (the contents are theirs, already compressed)."""
    out_comp: str | None = "" if not compression else None
    opaque = "," + urllib.parse.quote(contents, safe="")
    b64 = ";base64," + b64encode(contents).decode()
    if len(b64) < len(opaque):
        opaque = b64
    if not compression and allow_compression:
        gz = ";base64," + b64encode(gzip.compress(contents, 9, mtime=0)).decode()
        if len(gz) + len("gzip") < len(opaque):
            opaque, out_comp = gz, "gzip"
    return "data:" + opaque, out_comp


class _Local:
    """Reads files named relative to the files dir, refusing anything that leaves it."""

    def __init__(self, files_dir: str | os.PathLike[str] | None) -> None:
        self.base = Path(os.path.realpath(files_dir)) if files_dir else None

    def inside(self, rel: str) -> Path:
        if self.base is None:
            raise ValueError(NO_FILES_DIR)
        p = Path(os.path.realpath(self.base / rel.lstrip("/")))
        if p != self.base and self.base not in p.parents:
            raise ValueError(ESCAPE)
        return p

    def read(self, rel: str) -> bytes:
        """Messages name ``rel`` (what the config says), not where the files dir happens to be."""
        p = self.inside(rel)
        if not p.exists():
            raise ValueError(f"{rel}: no such file in the files directory")
        try:
            check_input(p, "local file")
        except ObeliskError as exc:
            raise ValueError(f"{rel}: {str(exc).split(': ', 1)[-1]}") from None
        if p.stat().st_size > MAX_RESOURCE:
            raise ValueError(f"{rel}: larger than {MAX_RESOURCE} bytes")
        try:
            return p.read_bytes()
        except OSError as exc:
            raise ValueError(f"{rel}: cannot read it ({exc.strerror})") from None


class Translator:
    """Normalized Butane (snake_case walked into Ignition names, sugar kept) -> Ignition config.

    ``tmap`` maps each Ignition pointer to the Butane pointer it came from; ``add`` reports at
    Butane pointers (the walker maps those on to the YAML as written)."""

    def __init__(self, spec: Version, files_dir: str | os.PathLike[str] | None, add: Any) -> None:
        self.spec = spec
        self.local = _Local(files_dir)
        self.add = add
        self.tmap: dict[str, str] = {}

    def run(self, cfg: dict[str, Any]) -> dict[str, Any]:
        out = self.convert(cfg, BUTANE_SCHEMA, "", "")
        out.setdefault("ignition", {})["version"] = vtext(self.spec)
        self.tmap.setdefault("/ignition", "/ignition")
        trees = cfg.get("storage", {}).get("trees", [])
        if trees:
            self.trees(out.setdefault("storage", {}), trees)
        return out

    def convert(self, value: Any, t: T, bptr: str, iptr: str) -> Any:
        self.tmap[iptr] = bptr
        if t.kind == "list":
            return [self.convert(v, t.item, join(bptr, i), join(iptr, i)) for i, v in enumerate(value)]  # type: ignore
        if t.kind != "obj":
            return value
        out: dict[str, Any] = {}
        for name, v in value.items():
            f = t.fields[name]
            if f.sugar:
                continue
            out[name] = self.convert(v, f.t, join(bptr, name), join(iptr, name))
        if "inline" in t.fields:
            self.resource(value, out, bptr, iptr)
        if "contents_local" in t.fields:
            self.contents_local(value, out, bptr, iptr)
        if "ssh_authorized_keys_local" in t.fields:
            self.keys_local(value, out, bptr, iptr)
        return out

    def resource(self, b: dict[str, Any], out: dict[str, Any], bptr: str, iptr: str) -> None:
        given = [k for k in ("local", "inline", "source") if k in b]
        if len(given) > 1:
            self.add(join(bptr, given[-1]), "error", "only one of the following can be set: inline, local, source")
            return
        if given == ["inline"]:
            data: bytes = b["inline"].encode()
        elif given == ["local"]:
            try:
                data = self.local.read(b["local"])
            except ValueError as exc:
                self.add(join(bptr, "local"), "error", str(exc))
                return
        else:
            return
        if self.spec == (3, 0):  # Butane 0.1 (fcos 1.0.0): a plain escaped data URL, compression untouched
            url, comp = "data:," + urllib.parse.quote(data, safe=""), None
        else:
            url, comp = make_data_url(data, b.get("compression"))
        out["source"] = url
        self.tmap[join(iptr, "source")] = join(bptr, given[0])
        if comp is not None:
            out["compression"] = comp
            self.tmap[join(iptr, "compression")] = join(bptr, given[0])

    def contents_local(self, b: dict[str, Any], out: dict[str, Any], bptr: str, iptr: str) -> None:
        if "contents_local" not in b:
            return
        if "contents" in b:
            self.add(join(bptr, "contents_local"), "error",
                     "only one of the following can be set: contents, contents_local")
            return
        try:
            out["contents"] = self.local.read(b["contents_local"]).decode("utf-8", "replace")
        except ValueError as exc:
            self.add(join(bptr, "contents_local"), "error", str(exc))
            return
        self.tmap[join(iptr, "contents")] = join(bptr, "contents_local")

    def keys_local(self, b: dict[str, Any], out: dict[str, Any], bptr: str, iptr: str) -> None:
        for i, rel in enumerate(b.get("ssh_authorized_keys_local", [])):
            kp = join(join(bptr, "ssh_authorized_keys_local"), i)
            try:
                text = self.local.read(rel).decode("utf-8", "replace")
            except ValueError as exc:
                self.add(kp, "error", str(exc))
                continue
            keys = out.setdefault("sshAuthorizedKeys", [])
            for line in re.split(r"\r?\n", text):
                if line:
                    self.tmap[join(join(iptr, "sshAuthorizedKeys"), len(keys))] = kp
                    keys.append(line)

    # -- storage.trees --
    def trees(self, storage: dict[str, Any], trees: list[dict[str, Any]]) -> None:
        files = storage.setdefault("files", [])
        links = storage.setdefault("links", [])
        for i, tree in enumerate(trees):
            tp = f"/storage/trees/{i}"
            if not tree.get("local"):
                self.add(tp, "error", "local is required")
                continue
            try:
                base = self.local.inside(tree["local"])
            except ValueError as exc:
                self.add(tp, "error", str(exc))
                continue
            if not base.is_dir():
                self.add(tp, "error", "root of tree must be a directory" if base.exists()
                         else f"{tree['local']}: no such directory in the files directory")
                continue
            self.walk_tree(base, tree.get("path") or "/", files, links, tp)
        if not files:
            del storage["files"]
        if not links:
            del storage["links"]

    def walk_tree(self, base: Path, dest: str, files: list[dict[str, Any]], links: list[dict[str, Any]],
                  tp: str) -> None:
        by_path = {f.get("path"): f for f in files}
        link_paths = {x.get("path"): x for x in links}
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
                src = Path(dirpath) / name
                rel = src.relative_to(base).as_posix()
                target = f"{dest.rstrip('/')}/{rel}"
                st = src.lstat()
                if stat.S_ISLNK(st.st_mode):
                    existing = link_paths.get(target)
                    if (existing is not None and existing.get("target")) or (existing is None and target in by_path):
                        self.add(tp, "error", f"{target}: matching filesystem node has existing contents or "
                                 "different type")
                        continue
                    if existing is None:
                        existing = {"path": target}
                        links.append(existing)
                        link_paths[target] = existing
                        self.tmap[f"/storage/links/{len(links) - 1}"] = tp
                    existing["target"] = os.readlink(src)
                elif stat.S_ISREG(st.st_mode):
                    self.tree_file(src, st, target, files, by_path, link_paths, tp)
                else:
                    self.add(tp, "error", f"{rel}: trees may only contain files, directories, and symlinks")
            # symlinked directories are links, not walked
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]

    def tree_file(self, src: Path, st: os.stat_result, target: str, files: list[dict[str, Any]],
                  by_path: dict[str, Any], link_paths: dict[str, Any], tp: str) -> None:
        existing = by_path.get(target)
        if (existing is not None and existing.get("contents", {}).get("source")) or \
                (existing is None and target in link_paths):
            self.add(tp, "error", f"{target}: matching filesystem node has existing contents or different type")
            return
        if st.st_size > MAX_RESOURCE:
            self.add(tp, "error", f"{src}: larger than {MAX_RESOURCE} bytes")
            return
        if existing is None:
            existing = {"path": target}
            files.append(existing)
            by_path[target] = existing
            self.tmap[f"/storage/files/{len(files) - 1}"] = tp
        contents = existing.setdefault("contents", {})
        url, comp = make_data_url(src.read_bytes(), contents.get("compression"))
        contents["source"] = url
        if comp is not None:
            contents["compression"] = comp
        if existing.get("mode") is None:
            existing["mode"] = 0o755 if st.st_mode & 0o111 else 0o644
