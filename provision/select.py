"""Which group a host belongs to: labels from the request, the most specific matching group wins."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from provision.model import _LABEL_KEY, MAX_LABEL_VALUE, Group, normalize_label

log = logging.getLogger("obelisk.provision")


class NoMatch(LookupError):
    """No group selects this host; the message says which labels were tried."""


@dataclass
class Labels:
    values: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # "mac=zz" and the like, for the log and the 404 text

    def text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.values.items())) or "no labels"


def labels_from_query(items: Iterable[tuple[str, str]]) -> Labels:
    """Query parameters → labels: the first value of each key; `mac` and `uuid` normalised;
    malformed reserved labels and unusable keys are dropped (and reported), never guessed."""
    out = Labels()
    for key, value in items:
        if key in out.values or any(d.startswith(key + "=") for d in out.dropped):
            continue
        if not _LABEL_KEY.match(key) or len(value) > MAX_LABEL_VALUE or not value:
            if value:
                out.dropped.append(f"{key[:64]}={value[:64]}")
            continue
        norm = normalize_label(key, value)
        if norm is None:
            out.dropped.append(f"{key}={value[:64]}")
            log.warning("ignoring malformed label %s=%r", key, value[:64])
            continue
        out.values[key] = norm
    return out


def selection_order(groups: Iterable[Group]) -> list[Group]:
    """Most selectors first; among equals, by selector text then id, so the choice never depends on
    the order files were listed in."""
    return sorted(groups, key=lambda g: (-g.specificity, g.selector_text(), g.id))


def select(ordered: list[Group], labels: Labels) -> Group:
    """``ordered`` must come from `selection_order`."""
    for g in ordered:
        if g.matches(labels.values):
            return g
    extra = f" (ignored malformed {', '.join(labels.dropped)})" if labels.dropped else ""
    raise NoMatch(f"no group matches {labels.text()}{extra}; {len(ordered)} group(s) tried, none is a default group")
