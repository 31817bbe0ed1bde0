"""Profiles, groups and labels: the provisioning data model (owner of the JSON files' format).

A **profile** says what to boot (kernel, initrds, arguments, or an obelisk release) and which
templates render the host's cloud-config, Ignition config and generic config. A **group** picks hosts by a
**selector** (labels that must all match) and names a profile; its metadata feeds the templates.
The store, the server, the write API and `obelisk provision check` all read and write through
these models.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from obelisk.errors import ObeliskError

# File-name safe and URL safe: ids become `profiles/<id>.json`, so no separators, no leading dot.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_ID = re.compile(ID_PATTERN)
# Template names live in `cloud/`, `generic/` and `ignition/`; the same rule keeps them inside those folders.
TEMPLATE_KINDS = ("cloud", "generic", "ignition")
LABEL_KEY_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)
MAX_LABEL_VALUE = 256

Ident = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
TemplateName = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
RELEASE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*(/[A-Za-z0-9][A-Za-z0-9_.+-]*)?$"
Arg = Annotated[str, StringConstraints(min_length=1, max_length=4096, pattern=r"^[^\x00-\x1f\x7f]*$")]


class ModelError(ObeliskError, ValueError):
    """A profile, group or label that cannot be used; the message names the field."""


class BadLabel(ModelError):
    """A request label whose value no template may see: a control character or a line break in it.
    The server answers 400 naming the label, never drops it silently (the host would get another group)."""


def valid_id(ident: str) -> bool:
    return bool(_ID.fullmatch(ident))  # match() would let a trailing newline through


# --- labels ----------------------------------------------------------------------------------------

_MAC_SEPARATED = re.compile(r"^[0-9a-f]{2}([:-])[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")
_MAC_DOTTED = re.compile(r"^[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4}$")
_MAC_BARE = re.compile(r"^[0-9a-f]{12}$")


def normalize_mac(value: str) -> str | None:
    """Colon, hyphen, Cisco-dot or bare hex form → lower-case colon form; None when it is not a MAC."""
    v = value.strip().lower()
    if _MAC_SEPARATED.match(v) or _MAC_DOTTED.match(v) or _MAC_BARE.match(v):
        hexdigits = re.sub(r"[^0-9a-f]", "", v)
        return ":".join(hexdigits[i:i + 2] for i in range(0, 12, 2))
    return None


# uuid.UUID() alone is too lenient for labels: int(..., 16) takes '_' and non-ASCII digits, and the
# hyphens may sit anywhere, so garbage would turn into some other host's UUID instead of being dropped.
_UUID = re.compile(r"^(?:urn:uuid:)?(\{)?([0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12})(?(1)\})$")


def normalize_uuid(value: str) -> str | None:
    """SMBIOS UUIDs arrive in either case and with or without braces or hyphens; compare them canonically."""
    m = _UUID.match(value.strip().lower())
    if m is None or ("-" in m.group(2) and m.group(2).count("-") != 4):  # all four hyphens or none
        return None
    return str(uuid.UUID(m.group(2)))


# C0 and C1 controls (tab, LF, CR, NEL U+0085 among them), the Unicode line and paragraph separators
# (YAML breaks lines at NEL and U+2028/9 too), and surrogates. The same set as LABEL_VALUE_PATTERN.
_LABEL_VALUE_BAD = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
LABEL_VALUE_PATTERN = "^[^\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029\\ud800-\\udfff]*$"


def check_label_text(key: str, value: str) -> None:
    """Refuse a value that is not one line of text: BadLabel names the label and the character.

    Templates paste labels into YAML, shell and boot scripts: a newline (``%0a``), a carriage return,
    a tab, NEL (U+0085) or a Unicode line or paragraph separator (U+2028/9) would let a request add
    lines (keys, units, ssh keys) to its own cloud-config.
    """
    m = _LABEL_VALUE_BAD.search(value)
    if m is None:
        return
    raise BadLabel(f"label {key!r} has a control character or line break (U+{ord(m.group()):04X} at position "
                   f"{m.start()}) in its value; a label must be one line of text")


def normalize_label(key: str, value: str) -> str | None:
    """The canonical form of one label value, or None when a reserved label's value is malformed."""
    if key == "mac":
        return normalize_mac(value)
    if key == "uuid":
        return normalize_uuid(value)
    return value


# --- profile and group -----------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Boot(_Strict):
    kernel: Annotated[str, StringConstraints(max_length=4096, pattern=r"^[^\x00-\x20\x7f]*$")] = ""
    initrd: list[Annotated[str, StringConstraints(min_length=1, max_length=4096, pattern=r"^[^\x00-\x20\x7f]+$")]] \
        = Field(default_factory=list, max_length=16)
    args: list[Arg] = Field(default_factory=list, max_length=256)


class Profile(_Strict):
    id: Ident
    name: Annotated[str, StringConstraints(max_length=256)] = ""
    # An obelisk release under the assets folder ("tiny/0.1.0", or "tiny" for its newest version):
    # kernel, initrd and the verity root hash arguments then come from its release.json.
    release: Annotated[str, StringConstraints(max_length=256, pattern=RELEASE_PATTERN)] | None = None
    boot: Boot = Field(default_factory=Boot)
    cloud_id: TemplateName | None = None
    generic_id: TemplateName | None = None
    # An Ignition JSON or Butane YAML template (in `ignition/`) that /ignition serves instead of the
    # cloud template: a profile can hand a host both a cloud-config and an Ignition config.
    ignition_id: TemplateName | None = None

    def templates(self) -> list[tuple[str, str]]:
        """The (kind, name) of every template this profile names."""
        refs = (("cloud", self.cloud_id), ("generic", self.generic_id), ("ignition", self.ignition_id))
        return [(kind, name) for kind, name in refs if name is not None]


class Group(_Strict):
    id: Ident
    name: Annotated[str, StringConstraints(max_length=256)] = ""
    profile: Ident
    selector: dict[Annotated[str, StringConstraints(pattern=LABEL_KEY_PATTERN)],
                   Annotated[str, StringConstraints(min_length=1, max_length=MAX_LABEL_VALUE)]] \
        = Field(default_factory=dict, max_length=32)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("selector")
    @classmethod
    def _normalize(cls, sel: dict[str, str]) -> dict[str, str]:
        out = {}
        for k, v in sel.items():
            n = normalize_label(k, v)
            if n is None:
                raise ValueError(f"selector {k}={v!r} is not a valid {k}")
            out[k] = n
        return out

    @property
    def specificity(self) -> int:
        return len(self.selector)

    def selector_text(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.selector.items()))

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.selector.items())


def describe(exc: ValidationError) -> str:
    """pydantic's report in one line: the first problem, with its field path."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{where}: {err['msg']}{more}"


def parse_profile(data: Any, *, ident: str | None = None) -> Profile:
    return _parse(Profile, data, ident, "profile")


def parse_group(data: Any, *, ident: str | None = None) -> Group:
    return _parse(Group, data, ident, "group")


def _parse(model: type[_Strict], data: Any, ident: str | None, what: str):  # noqa: ANN202
    if not isinstance(data, dict):
        raise ModelError(f"a {what} must be a JSON object")
    if ident is not None:
        if "id" not in data:
            data = {**data, "id": ident}
        elif data["id"] != ident:
            raise ModelError(f"{what} id {data['id']!r} does not match its name {ident!r}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ModelError(f"{what}: {describe(exc)}") from None
