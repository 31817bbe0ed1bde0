"""`obelisk provision check`: every profile, group and template of a data folder, checked offline."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from obelisk.inputs import InputFileError, check_input
from provision import render
from provision.model import TEMPLATE_KINDS, Group
from provision.releases import AssetError, Releases
from provision.select import Labels
from provision.store import Store, StoreError

# What a booting host's request brings (boot.ipxe asks with all of these): stood in for, so only
# what the group itself must supply is reported missing.
_PROBE_URL = "http://provision.invalid:8080"
_PROBE_LABELS = {"mac": "52:54:00:00:00:00", "uuid": "00000000-0000-0000-0000-000000000000",
                 "hostname": "probe", "serial": "probe", "arch": "x86_64", "domain": "probe.invalid"}


@dataclass
class Finding:
    level: str  # "error" | "warning"
    where: str
    message: str

    def text(self) -> str:
        return f"{self.where}: {self.level}: {self.message}"


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    def add(self, level: str, where: str, message: str) -> None:
        self.findings.append(Finding(level, where, message))


def check(data: Path, assets: Path | None = None) -> Report:
    rep = Report()
    if not data.is_dir():
        rep.add("error", str(data), "no such folder; a data folder holds profiles/, groups/, cloud/ and generic/")
        return rep
    store = Store(data)
    releases = Releases(assets)
    for sub in ("profiles", "groups", *TEMPLATE_KINDS):
        d = data / sub
        if d.is_dir():
            valid = set(store.ids(sub))
            for f in sorted(d.iterdir()):
                name = f.name[:-5] if sub in ("profiles", "groups") and f.name.endswith(".json") else f.name
                if f.name.startswith("."):
                    continue
                if f.exists() and not f.is_file() and not f.is_dir():
                    # A FIFO or socket: the server lists only files, so hosts needing it get a 404 or
                    # a less specific group; reading it would block. Named here, never opened.
                    try:
                        check_input(f, "data file")
                    except InputFileError as exc:
                        rep.add("error", f"{sub}/{f.name}", str(exc).partition(": ")[2])
                    continue
                if f.is_file() and name not in valid:
                    # A profile or group the server skips for its name is one the operator meant to
                    # use: its hosts would silently get a less specific group, so that is an error.
                    meant = sub in ("profiles", "groups") and f.name.endswith(".json")
                    rep.add("error" if meant else "warning", f"{sub}/{f.name}",
                            f"{'the server ignores this file' if meant else 'ignored'}: not a valid name "
                            "(letters, digits, '.', '_', '-', at most 64, not starting with '.' or '-'; "
                            "profiles and groups end in .json)")
    profiles = {}
    for ident in store.ids("profiles"):
        try:
            profiles[ident] = store.profile(ident)
        except StoreError as exc:
            rep.add("error", f"profiles/{ident}.json", _unprefixed(str(exc), f"profiles/{ident}.json"))
    templates: dict[tuple[str, str], str] = {}
    for kind in TEMPLATE_KINDS:
        for name in store.ids(kind):
            try:
                src = store.template(kind, name)
                render.compile_template(src, f"{kind}/{name}")
                templates[(kind, name)] = src
            except (StoreError, render.TemplateSyntax) as exc:
                rep.add("error", f"{kind}/{name}", _unprefixed(str(exc), f"{kind}/{name}"))
    groups: list[Group] = []
    for ident in store.ids("groups"):
        try:
            groups.append(store.group(ident))
        except StoreError as exc:
            rep.add("error", f"groups/{ident}.json", _unprefixed(str(exc), f"groups/{ident}.json"))
    rep.counts = {"profiles": len(profiles), "groups": len(groups),
                  "templates": sum(len(store.ids(k)) for k in TEMPLATE_KINDS)}
    for p in profiles.values():
        where = f"profiles/{p.id}.json"
        for kind, name in p.templates():
            if not (data / kind / name).is_file():
                rep.add("error", where, f"{kind}_id {name!r}: no {kind}/{name}")
        if p.release and (p.boot.kernel or p.boot.initrd):
            rep.add("error", where, "give either release or boot.kernel/boot.initrd, not both")
        elif not p.release and not p.boot.kernel:
            rep.add("warning", where, "no release and no boot.kernel: /ipxe and /grub will answer 404")
        if p.release:
            try:
                releases.resolve(p.release)
            except AssetError as exc:
                rep.add("warning", where, str(exc))
    seen: dict[str, str] = {}
    for g in groups:
        where = f"groups/{g.id}.json"
        if g.profile not in profiles:
            rep.add("error", where, f"profile {g.profile!r} does not exist (no profiles/{g.profile}.json)")
        sel = g.selector_text()
        if sel in seen:
            what = "default groups" if not sel else f"groups with the same selector ({sel})"
            rep.add("error", where, f"{what}: {seen[sel]} and {g.id}; only {min(seen[sel], g.id)} is ever chosen")
        else:
            seen[sel] = g.id
        p = profiles.get(g.profile)
        if p is None:
            continue
        _render_for(rep, g, p, templates, where)
    if groups and "" not in seen:
        rep.add("warning", "groups", "no default group (one without selector): hosts that match none get a 404")
    return rep


def _unprefixed(message: str, where: str) -> str:
    """The store's messages start with the file's name, which the finding already shows. Only that
    exact prefix goes: splitting at the first ': ' would cut a JSON error's own text in half."""
    for sep in (": ", " "):
        if message.startswith(where + sep):
            return message[len(where) + len(sep):]
    return message


def _render_for(rep: Report, g: Group, p, templates: dict[tuple[str, str], str], where: str) -> None:  # noqa: ANN001
    """Render each of the group's templates with the group's own data and a stand-in request."""
    labels = Labels({**_PROBE_LABELS, **g.selector})
    ctx = render.Context(g, labels, "&".join(f"{k}={v}" for k, v in labels.values.items()), _PROBE_URL)
    for kind, name in p.templates():
        src = templates.get((kind, name))
        if src is None:
            continue
        try:
            render.RENDERERS[kind](src, f"{kind}/{name}", ctx)
        except render.LabelMissing as exc:
            # Not broken data: hosts that send the label are served; the others get a 400.
            rep.add("warning", where, f"{exc}: hosts that do not send it get a 400")
        except render.RenderError as exc:
            rep.add("error", where, str(exc))
    for i, a in enumerate(p.boot.args):
        if "{{" in a or "{%" in a:
            try:
                render.render(a, f"profile {p.id} boot.args[{i}]", ctx)
            except render.LabelMissing as exc:
                rep.add("warning", where, f"{exc}: hosts that do not send it get a 400")
            except render.RenderError as exc:
                rep.add("error", where, str(exc))
