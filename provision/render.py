"""What the server answers: iPXE and GRUB scripts, templates rendered strictly, metadata as env lines.

Templates are jinja2 in a sandbox with StrictUndefined: a missing variable is an error, never an
empty string in a host's config. `{{ value | yaml }}` inserts a value as a quoted YAML scalar.
Their data is the group's metadata, then the group's selector (over metadata of the same name),
then `request.query` (the normalised labels) and `request.raw_query`. Kernel arguments are
rendered the same way (so `{{ server_url }}` works in them); iPXE's own `${mac:hexhyp}` and the
like pass through for the firmware to expand.

A profile's cloud template may also be an Ignition JSON or Butane YAML config (recognised by its
rendered content, `cloudconfig.ignition.detect`): it is validated by the Ignition engine, `/cloud`
serves it as rendered and `/ignition` serves the Ignition JSON it stands for (Butane translated, as
matchbox's `/ignition` does). A profile's `ignition_id` names a template of its own (in `ignition/`,
Ignition or Butane only) that `/ignition` serves instead, so one profile can give a host both.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from cloudconfig import ignition
from cloudconfig.validate import validate_bytes
from obelisk.errors import ObeliskError
from provision.model import Group, Profile
from provision.releases import PxeRelease
from provision.select import Labels

# The chain script: iPXE fills these from the firmware and asks /ipxe for the host's own script.
BOOT_IPXE = ("#!ipxe\nchain ipxe?uuid=${uuid}&mac=${mac:hexhyp}&domain=${domain}&hostname=${hostname}"
             "&serial=${serial}&arch=${buildarch:uristring}\n")
MAX_OUTPUT = 1 << 20


class RenderError(ObeliskError, RuntimeError):
    """A template could not produce a config for this host; the message says which and why."""


class LabelMissing(RenderError):
    """The template needs a request label (`request.query.mac`) the request did not give: the
    request's fault, not the data's, so the server answers 400 rather than 500."""


class NotIgnition(RenderError):
    """/ignition for a profile whose cloud template is a cloud-config: there is no Ignition config to
    serve (a 404, as a profile without cloud_id)."""


class TemplateSyntax(ObeliskError, ValueError):
    pass


class _Query(dict):
    """`request.query` in template data: a dict whose missing keys the undefined below recognises."""


class _LabelUndefined(jinja2.UndefinedError):
    def __init__(self, label: str) -> None:
        super().__init__(f"request label {label!r} is missing")
        self.label = label


class _Undefined(jinja2.StrictUndefined):
    """StrictUndefined that tells a label missing from `request.query` (a host that did not send it,
    or sent it malformed) from metadata missing in the group."""

    __slots__ = ()

    def __init__(self, hint: str | None = None, obj: Any = jinja2.utils.missing, name: str | None = None,
                 exc: type[jinja2.UndefinedError] = jinja2.UndefinedError) -> None:
        if isinstance(obj, _Query) and name is not None:
            exc = lambda _message, label=name: _LabelUndefined(label)  # noqa: E731 - called like the class
        super().__init__(hint, obj, name, exc)


_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}  # YAML has these too; easier to read than \\x0a


def yaml_quote(value: Any) -> str:
    """``{{ value | yaml }}``: ``value`` as one double-quoted YAML scalar, safe wherever a scalar may
    stand (after ``key:``, as a list item, in a flow ``[...]``/``{...}``), whatever it holds.

    ``"`` and ``\\`` are escaped, and so is every character that is not printable (line breaks of
    any kind: \\n, \\r, NEL, U+2028/9; tabs; controls; format characters), as YAML's own escapes
    (``\\x..``, ``\\u....``, ``\\U........``), so the value can neither end the scalar nor start a
    line. Parsed back (YAML 1.1 or 1.2), it is the same string. Non-strings are quoted as ``str()``
    gives them; an undefined value is still an error (strict mode), and so is a lone surrogate.
    """
    text = value if isinstance(value, str) else str(value)
    out = ['"']
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[c])
        elif c.isprintable():
            out.append(c)
        elif "\ud800" <= c <= "\udfff":  # only from a JSON "\\ud800" escape; no YAML parser takes it back
            raise ValueError(f"the yaml filter cannot quote a lone surrogate (U+{ord(c):04X}); fix the value")
        else:
            o = ord(c)
            out.append(f"\\x{o:02x}" if o <= 0xFF else f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")
    out.append('"')
    return "".join(out)


_env = SandboxedEnvironment(undefined=_Undefined, autoescape=False, keep_trailing_newline=True)
_env.filters["yaml"] = yaml_quote
_compiled: dict[str, jinja2.Template] = {}
_valid: dict[str, str | None] = {}  # sha256 of a rendered config -> None (valid) or "an invalid ... (first error)"
_translated: dict[str, str] = {}  # sha256 of a rendered Ignition/Butane config -> its Ignition JSON
MAX_CACHED = 4096


def compile_template(source: str, name: str) -> jinja2.Template:
    key = hashlib.sha256(source.encode()).hexdigest()
    tpl = _compiled.get(key)
    if tpl is None:
        try:
            tpl = _env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateSyntax(f"template {name}: line {exc.lineno}: {exc.message}") from None
        if len(_compiled) > 512:
            _compiled.clear()
        _compiled[key] = tpl
    return tpl


@dataclass(frozen=True)
class Context:
    group: Group
    labels: Labels
    raw_query: str
    server_url: str

    def data(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.group.metadata)
        d.update(self.group.selector)
        d["request"] = {"query": _Query(self.labels.values), "raw_query": self.raw_query}
        d["server_url"] = self.server_url
        return d


def render(source: str, name: str, ctx: Context) -> str:
    tpl = compile_template(source, name)
    try:
        out = tpl.render(ctx.data())
    except _LabelUndefined as exc:
        dropped = f" (ignored malformed {ctx.labels.dropped_text()})" if ctx.labels.dropped else ""
        raise LabelMissing(f"{name} for group {ctx.group.id!r} needs the request label {exc.label!r}, which this "
                           f"request did not give{dropped}") from None
    except jinja2.UndefinedError as exc:
        raise RenderError(f"{name} for group {ctx.group.id!r}: {exc.message}; add it to the group's metadata "
                          f"or selector") from None
    except jinja2.exceptions.SecurityError as exc:
        raise RenderError(f"{name} for group {ctx.group.id!r}: refused by the template sandbox: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any template runtime error is the template's, reported as such
        raise RenderError(f"{name} for group {ctx.group.id!r}: {type(exc).__name__}: {exc}") from None
    if len(out) > MAX_OUTPUT:
        raise RenderError(f"{name} for group {ctx.group.id!r} rendered {len(out)} bytes, more than {MAX_OUTPUT}")
    return out


def render_cloud(source: str, name: str, ctx: Context) -> str:
    """Render, then refuse anything `obelisk cloudconfig validate` would reject (a cloud-config, a
    script, or an Ignition/Butane config; the server has no files dir, so Butane `local:` is refused)."""
    text = render(source, name, ctx)
    key = hashlib.sha256(text.encode()).hexdigest()
    if key not in _valid:
        raw = text.encode()
        kind = ignition.detect(raw)
        report = ignition.validate(raw) if kind else validate_bytes(raw)
        first = report.errors[0].text() if report.errors else None
        if kind is None and report.kind not in ("cloud-config", "script"):
            first = first or f"rendered {report.kind} user-data, not a #cloud-config or a script (nor an Ignition or " \
                             "Butane config)"
        what = {"ignition": "Ignition config", "butane": "Butane config"}.get(kind or "", "cloud-config")
        if len(_valid) > MAX_CACHED:
            _valid.clear()
        _valid[key] = None if first is None else f"an invalid {what} ({first})"
    problem = _valid[key]
    if problem is not None:
        raise RenderError(f"{name} for group {ctx.group.id!r} rendered {problem}; check it with 'obelisk provision "
                          "check'")
    return text


def render_ignition(source: str, name: str, ctx: Context) -> str:
    """/ignition: the rendered (and validated) Ignition config as JSON; Butane is translated first."""
    text = render_cloud(source, name, ctx)
    key = hashlib.sha256(text.encode()).hexdigest()
    out = _translated.get(key)
    if out is None:
        if not ignition.detect(text.encode()):
            raise NotIgnition(f"{name} for group {ctx.group.id!r} renders a cloud-config or script, not an Ignition "
                              "or Butane config: hosts read it from /cloud")
        data, report = ignition.translate(text.encode())
        if data is None:  # pragma: no cover - render_cloud validated the same text
            raise RenderError(f"{name} for group {ctx.group.id!r}: {report.errors[0].text()}")
        if len(_translated) > MAX_CACHED:
            _translated.clear()
        out = _translated[key] = data.decode()
    return out


def render_ignition_template(source: str, name: str, ctx: Context) -> str:
    """A profile's ``ignition_id`` template: it must be an Ignition or Butane config (a cloud-config in
    ``ignition/`` is broken data, a 500, not a missing config)."""
    try:
        return render_ignition(source, name, ctx)
    except NotIgnition:
        raise RenderError(f"{name} for group {ctx.group.id!r} renders a cloud-config or script; an ignition "
                          "template must be an Ignition JSON or Butane YAML config (cloud-configs go in cloud/ "
                          "and the profile's cloud_id)") from None


# What renders each template kind (provision/model.py TEMPLATE_KINDS).
RENDERERS = {"cloud": render_cloud, "generic": render, "ignition": render_ignition_template}


# --- boot scripts ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class BootSpec:
    kernel: str
    initrd: list[str]
    args: list[str]


def boot_spec(profile: Profile, release: PxeRelease | None, ctx: Context) -> BootSpec:
    if release is not None:
        kernel, initrd, args = release.kernel, [release.initrd], [*release.args(), *profile.boot.args]
    else:
        kernel, initrd, args = profile.boot.kernel, list(profile.boot.initrd), list(profile.boot.args)
    if not kernel:
        raise RenderError(f"profile {profile.id!r} has no kernel: set boot.kernel or release")
    rendered = []
    first_own = len(args) - len(profile.boot.args)  # a release's own arguments come first
    for i, a in enumerate(args):
        # Errors name the index in the profile's file, not in the list with the release's prepended.
        where = f"boot.args[{i - first_own}]" if i >= first_own else f"release argument {a!r}"
        r = render(a, f"profile {profile.id} {where}", ctx) if ("{{" in a or "{%" in a) else a
        if not r.strip():
            continue
        if any(ord(c) < 0x20 or c == "\x7f" for c in r):
            raise RenderError(f"profile {profile.id!r} {where} rendered a control character")
        rendered.append(r)
    return BootSpec(kernel, initrd, rendered)


def _absolute(url: str, server_url: str) -> str:
    return server_url.rstrip("/") + url if url.startswith("/") else url


def ipxe_script(spec: BootSpec, server_url: str) -> str:
    lines = ["#!ipxe", " ".join(["kernel", _absolute(spec.kernel, server_url), *spec.args])]
    lines += [f"initrd {_absolute(i, server_url)}" for i in spec.initrd]
    lines.append("boot")
    return "\n".join(lines) + "\n"


def _grub_path(url: str, server_url: str) -> str:
    """GRUB reads over HTTP as (http,host:port)/path, an IPv6 host in brackets: GRUB's net.c splits
    the port off at the ':' after the host (Debian's 2.06 and upstream 2.12); a ',' there would be
    taken as part of the host name."""
    url = _absolute(url, server_url)
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # an unusable port in --public-url: leave the URL as it is rather than guess
        return url
    if parts.scheme != "http" or not parts.hostname:
        return url  # tftp paths and the like: the boot device's own
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return f"(http,{host}{f':{port}' if port else ''}){path}"


def _grub_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


_IPXE_VAR = re.compile(r"\$\{(?:net\d+/)?([a-z]+)(?::([a-z]+))?\}")


def fill_ipxe_vars(arg: str, labels: dict[str, str]) -> str:
    """GRUB cannot expand iPXE's ${mac:hexhyp} & co.; the request's own labels stand in for them."""
    def sub(m: re.Match) -> str:
        value = labels.get(m.group(1))
        if value is None:
            return m.group(0)
        return value.replace(":", "-") if m.group(1) == "mac" and m.group(2) == "hexhyp" else value
    return _IPXE_VAR.sub(sub, arg)


def grub_script(spec: BootSpec, server_url: str, title: str, labels: dict[str, str] | None = None) -> str:
    """One menu entry with upstream GRUB's `linux`/`initrd` (EFI stub on UEFI, no linuxefi patch needed)."""
    filled = [fill_ipxe_vars(a, labels or {}) for a in spec.args]
    # Quoted when GRUB's parser would act on a character: separators, variables, and the glob
    # characters its wildcard expansion (the regexp module) would try on a URL's `?`.
    args = " ".join(_grub_quote(a) if re.search(r"[\s;&|<>$'\"\\#{}?*\[\]]", a) else a for a in filled)
    initrds = " ".join(_grub_quote(_grub_path(i, server_url)) for i in spec.initrd)
    body = [
        "default=0",
        "timeout=1",
        f"menuentry {_grub_quote(title)} {{",
        "  echo 'Loading kernel'",
        f"  linux {_grub_quote(_grub_path(spec.kernel, server_url))} {args}".rstrip(),
    ]
    if initrds:
        body += ["  echo 'Loading initrd'", f"  initrd {initrds}"]
    body.append("}")
    return "\n".join(body) + "\n"


# --- metadata --------------------------------------------------------------------------------------

_ENV_SAFE = re.compile(r"^[A-Za-z0-9_./:,@%+=-]*$")


def _env_value(v: Any) -> str:
    s = v if isinstance(v, str) else ("true" if v is True else "false" if v is False else
                                      "" if v is None else str(v))
    if _ENV_SAFE.match(s):
        return s
    # systemd EnvironmentFile= and POSIX shells both read this double-quoted form.
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`") \
        .replace("\n", "\\n") + '"'


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}_{k}" if prefix else str(k), v, out)
        return
    key = re.sub(r"[^A-Za-z0-9_]", "_", prefix).upper()
    if not key or key[0].isdigit():  # a shell or EnvironmentFile= name cannot start with a digit
        key = "_" + key
    if isinstance(value, list):  # a list becomes one comma-separated value
        value = ",".join(x if isinstance(x, str) else json.dumps(x, sort_keys=True) for x in value)
    out[key] = _env_value(value)


def metadata_env(ctx: Context) -> str:
    """Group metadata, selectors and the request as `KEY=value` lines (matchbox's /metadata)."""
    out: dict[str, str] = {}
    _flatten("", dict(ctx.group.metadata), out)
    _flatten("", dict(ctx.group.selector), out)
    _flatten("request_query", dict(ctx.labels.values), out)
    out["REQUEST_RAW_QUERY"] = _env_value(ctx.raw_query)
    return "".join(f"{k}={v}\n" for k, v in sorted(out.items()))
