"""Read Ignition JSON and Butane YAML into plain values, remembering where every value and key is.

Ignition reports problems by the JSON pointer of the field; users fix them in an editor, so each
pointer is also given a line and column. Python's json module keeps no positions, so JSON is read
by a small recursive-descent reader (strings go through json's own C scanner); YAML comes from
PyYAML's composer, whose node marks are exact, as in cloudconfig/validate.py.

Both readers are bounded: nesting depth, and for YAML the number of nodes after aliases are
expanded (an alias bomb would otherwise take minutes and gigabytes).
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from obelisk.errors import ObeliskError

MAX_DEPTH = 64
MAX_YAML_NODES = 200_000
_TAG = "tag:yaml.org,2002:"


class ReadError(ObeliskError):
    """The text is not well-formed JSON/YAML: ``line``/``column`` say where."""

    def __init__(self, line: int, column: int, message: str) -> None:
        super().__init__(message)
        self.line, self.column, self.message = line, column, message


@dataclass(frozen=True)
class Raw:
    """A YAML scalar as written: Butane decides its type from the field it lands in (yaml.v3 does)."""

    tag: str  # "str" | "int" | "bool" | "null" | "float" | other YAML tag names
    text: str
    quoted: bool = False  # written in quotes or as a block: never a number or a bool


@dataclass
class Doc:
    value: Any
    marks: dict[str, tuple[int, int]] = field(default_factory=dict)  # pointer -> (line, column) of the value
    keys: dict[str, tuple[int, int]] = field(default_factory=dict)  # pointer -> (line, column) of its key
    duplicates: list[tuple[str, int, int, int]] = field(default_factory=list)  # (pointer, line, col, first line)

    def where(self, pointer: str, *, key: bool = False) -> tuple[int, int]:
        """Position of ``pointer``, or of its nearest ancestor that has one (a missing field)."""
        p = pointer
        while True:
            if key and p in self.keys:
                return self.keys[p]
            if p in self.marks:
                return self.marks[p]
            if not p:
                return (1, 1)
            p = p.rsplit("/", 1)[0]


def escape(token: object) -> str:
    return str(token).replace("~", "~0").replace("/", "~1")


def join(pointer: str, token: object) -> str:
    return f"{pointer}/{escape(token)}"


def tokens(pointer: str) -> list[str]:
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]] if pointer else []


def through(tmap: dict[str, str], pointer: str, spell: Callable[[str], str] = lambda t: t) -> str:
    """Map a pointer through ``tmap`` (output -> input pointers): its nearest mapped ancestor, plus
    the rest of the pointer (spelled as the input spells field names) for fields that are absent."""
    rest: list[str] = []
    p = pointer
    while p and p not in tmap:
        p, _, last = p.rpartition("/")
        rest.append(last)
    base = tmap.get(p, p)
    for t in reversed(rest):
        base = f"{base}/{spell(t) if not t.isdigit() else t}"
    return base


# --- JSON -----------------------------------------------------------------------------------------

_WS = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Lines:
    def __init__(self, text: str) -> None:
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def pos(self, offset: int) -> tuple[int, int]:
        i = bisect.bisect_right(self.starts, offset) - 1
        return i + 1, offset - self.starts[i] + 1


class _JSON:
    def __init__(self, text: str) -> None:
        self.s = text
        self.lines = _Lines(text)
        self.marks: dict[str, int] = {}
        self.keys: dict[str, int] = {}
        self.dups: list[tuple[str, int, int]] = []

    def fail(self, offset: int, message: str) -> ReadError:
        line, col = self.lines.pos(min(offset, len(self.s)))
        return ReadError(line, col, f"JSON syntax error: {message}")

    def ws(self, i: int) -> int:
        return _WS.match(self.s, i).end()  # type: ignore[union-attr]

    def value(self, i: int, ptr: str, depth: int) -> tuple[Any, int]:
        if depth > MAX_DEPTH:
            raise self.fail(i, f"nested more than {MAX_DEPTH} levels deep")
        self.marks[ptr] = i
        s = self.s
        c = s[i:i + 1]
        if c == "{":
            return self.obj(i + 1, ptr, depth)
        if c == "[":
            return self.arr(i + 1, ptr, depth)
        if c == '"':
            return self.string(i)
        if s.startswith("true", i):
            return True, i + 4
        if s.startswith("false", i):
            return False, i + 5
        if s.startswith("null", i):
            return None, i + 4
        m = _NUMBER.match(s, i)
        if m and m.end() > i:
            text = m.group(0)
            if len(text) > 400:  # int() refuses more than 4300 digits; no config needs a fraction of that
                raise self.fail(i, f"a number of {len(text)} digits")
            return (float(text) if m.group(1) or m.group(2) else int(text)), m.end()
        if not c:
            raise self.fail(i, "unexpected end of input, expected a value")
        raise self.fail(i, f"unexpected character {c!r}, expected a value")

    def string(self, i: int) -> tuple[str, int]:
        try:
            text, end = json.decoder.scanstring(self.s, i + 1, True)  # type: ignore[attr-defined]
        except json.JSONDecodeError as exc:
            raise self.fail(exc.pos, exc.msg.lower()) from None
        # a lone surrogate escape cannot be written as UTF-8; Go's decoder makes it U+FFFD too
        return (_SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text), end

    def obj(self, i: int, ptr: str, depth: int) -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {}
        first: dict[str, int] = {}
        i = self.ws(i)
        if self.s[i:i + 1] == "}":
            return out, i + 1
        while True:
            if self.s[i:i + 1] != '"':
                raise self.fail(i, "expected a quoted key")
            kpos = i
            key, i = self.string(i)
            i = self.ws(i)
            if self.s[i:i + 1] != ":":
                raise self.fail(i, f"expected ':' after the key \"{key}\"")
            i = self.ws(i + 1)
            kptr = join(ptr, key)
            if key in first:
                self.dups.append((kptr, kpos, first[key]))
            first[key] = kpos
            self.keys[kptr] = kpos
            out[key], i = self.value(i, kptr, depth + 1)
            i = self.ws(i)
            c = self.s[i:i + 1]
            if c == "}":
                return out, i + 1
            if c != ",":
                raise self.fail(i, "expected ',' or '}' after an object member")
            i = self.ws(i + 1)

    def arr(self, i: int, ptr: str, depth: int) -> tuple[list[Any], int]:
        out: list[Any] = []
        i = self.ws(i)
        if self.s[i:i + 1] == "]":
            return out, i + 1
        while True:
            v, i = self.value(i, join(ptr, len(out)), depth + 1)
            out.append(v)
            i = self.ws(i)
            c = self.s[i:i + 1]
            if c == "]":
                return out, i + 1
            if c != ",":
                raise self.fail(i, "expected ',' or ']' after an array element")
            i = self.ws(i + 1)


def read_json(text: str) -> Doc:
    """Parse strict JSON (as Go's encoding/json: no comments, no trailing commas, no NaN)."""
    p = _JSON(text)
    start = p.ws(0)
    value, end = p.value(start, "", 0)
    end = p.ws(end)
    if end != len(text):
        raise p.fail(end, "unexpected data after the top-level value")
    doc = Doc(value)
    doc.marks = {k: p.lines.pos(v) for k, v in p.marks.items()}
    doc.keys = {k: p.lines.pos(v) for k, v in p.keys.items()}
    for kptr, at, first in p.dups:
        line, col = p.lines.pos(at)
        doc.duplicates.append((kptr, line, col, p.lines.pos(first)[0]))
    return doc


# --- YAML -----------------------------------------------------------------------------------------

def _compose(text: str) -> Node | None:
    fast = getattr(yaml, "CSafeLoader", None)
    if fast is not None:
        try:
            return yaml.compose(text, Loader=fast)
        except (yaml.YAMLError, RecursionError):
            pass  # the pure-Python parser gives the messages with the line to fix
    return yaml.compose(text, Loader=yaml.SafeLoader)


def _yaml_error(exc: Exception) -> ReadError:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        if exc.context_mark and exc.context and "simple key" in exc.context:
            mark = exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        msg = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            msg = f"{exc.problem} ({exc.context})"
        return ReadError(line, col, f"YAML syntax error: {msg}")
    if isinstance(exc, yaml.reader.ReaderError):
        return ReadError(1, 1, f"YAML syntax error: {exc.reason}")
    return ReadError(1, 1, f"YAML syntax error: {exc}")


class _YAML:
    def __init__(self) -> None:
        self.doc = Doc(None)
        self.budget = MAX_YAML_NODES

    def convert(self, node: Node, ptr: str, depth: int) -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise ReadError(node.start_mark.line + 1, node.start_mark.column + 1,
                            f"YAML expands to more than {MAX_YAML_NODES} nodes (aliases repeat too much)")
        if depth > MAX_DEPTH:
            raise ReadError(node.start_mark.line + 1, node.start_mark.column + 1,
                            f"YAML is nested more than {MAX_DEPTH} levels deep")
        self.doc.marks[ptr] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, MappingNode):
            out: dict[str, Any] = {}
            first: dict[str, int] = {}
            for knode, vnode in node.value:
                kline, kcol = knode.start_mark.line + 1, knode.start_mark.column + 1
                if not isinstance(knode, ScalarNode) or knode.tag == _TAG + "null":
                    raise ReadError(kline, kcol, "keys must be plain names")
                if knode.tag == _TAG + "merge":
                    raise ReadError(kline, kcol, "YAML merge keys (<<) are not supported; write the keys out")
                key = knode.value
                kptr = join(ptr, key)
                if key in first:
                    # yaml.v3 (Butane) refuses a repeated key; so do we, naming both lines
                    raise ReadError(kline, kcol, f'mapping key "{key}" already defined at line {first[key]}')
                first[key] = kline
                self.doc.keys[kptr] = (kline, kcol)
                out[key] = self.convert(vnode, kptr, depth + 1)
            return out
        if isinstance(node, SequenceNode):
            return [self.convert(item, join(ptr, i), depth + 1) for i, item in enumerate(node.value)]
        assert isinstance(node, ScalarNode)
        tag = node.tag[len(_TAG):] if node.tag.startswith(_TAG) else node.tag
        # plain style is None (pure-Python parser) or "" (libyaml)
        return None if tag == "null" else Raw(tag, node.value, node.style not in (None, ""))


def read_yaml(text: str) -> Doc:
    try:
        node = _compose(text)
    except RecursionError:
        raise ReadError(1, 1, "YAML is nested too deeply") from None
    except yaml.YAMLError as exc:
        raise _yaml_error(exc) from None
    if node is None:
        return Doc(None)
    y = _YAML()
    y.doc.value = y.convert(node, "", 0)
    return y.doc


def yaml_int(text: str) -> int | None:
    """A YAML integer as yaml.v3 reads it into an int field: decimal, 0644 / 0o644 octal, 0x hex, 0b binary."""
    t = text.replace("_", "")
    sign = -1 if t.startswith("-") else 1
    t = t.lstrip("+-")
    try:
        if re.fullmatch(r"0[oO][0-7]+", t):
            return sign * int(t[2:], 8)
        if re.fullmatch(r"0[0-7]+", t):
            return sign * int(t, 8)
        if re.fullmatch(r"0[xX][0-9a-fA-F]+", t):
            return sign * int(t, 16)
        if re.fullmatch(r"0[bB][01]+", t):
            return sign * int(t[2:], 2)
        if re.fullmatch(r"[0-9]+", t):
            return sign * int(t)
    except ValueError:
        return None
    return None
