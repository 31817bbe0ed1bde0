"""The validation report for Ignition and Butane: cloud-config's Report, with JSON pointers as paths."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from cloudconfig.validate import Entry, Report


class IgnEntry(Entry):
    """One problem; ``path`` is the JSON pointer of the field as written (RFC 6901, "" for the root)."""

    def text(self) -> str:
        where = f" {self.path}:" if self.path else ""
        at = f"line {self.line} column {self.column}: " if self.line else ""  # line 0: no text (a merged config)
        return f"{at}{self.level}:{where} {self.message}"


@dataclass
class IgnitionReport(Report):
    """kind is "ignition" or "butane"; ``value`` is the config in Ignition's JSON shape when it is valid."""

    variant: str | None = None  # "fcos" | "flatcar" for Butane
    version: str | None = None  # the version written in the config (Ignition spec or Butane version)
    spec: str | None = None  # the Ignition spec the config stands for ("3.4.0")

    def add(self, line: int, column: int, level: str, path: str, message: str) -> None:
        self.entries.append(IgnEntry(line, column, level, path, message))

    def sort(self) -> None:
        self.entries.sort(key=lambda e: (e.line, e.column, e.level != "error"))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "variant": self.variant, "version": self.version, "spec": self.spec,
                "ok": self.ok, "errors": len(self.errors), "warnings": len(self.entries) - len(self.errors),
                "entries": [asdict(e) for e in self.entries]}
