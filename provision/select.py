"""Which group a host belongs to: labels from the request, the most specific matching group wins."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from provision.model import _LABEL_KEY, MAX_LABEL_VALUE, Group, normalize_label

log = logging.getLogger("obelisk.provision")


class NoMatch(LookupError):
    """No group selects this host; the message says which labels were tried."""


MAX_REPORTED = 8  # dropped labels named in a 404 or a log line; a hostile query may carry thousands


def _shown(text: str) -> str:
    """A query value as it may appear in a log line or a one-line error: control characters escaped."""
    return text if text.isprintable() else repr(text)[1:-1]


@dataclass
class Labels:
    values: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # "mac=zz" and the like, for the log and the 404 text

    def text(self) -> str:
        """For logs and error lines: the first labels by name, long values cut (a query may be megabytes)."""
        items = sorted(self.values.items())
        shown = [f"{_shown(k)}={_shown(v if len(v) <= 80 else v[:64] + '...')}" for k, v in items[:MAX_REPORTED * 2]]
        more = len(items) - len(shown)
        return ", ".join(shown) + (f" and {more} more" if more > 0 else "") or "no labels"

    def dropped_text(self) -> str:
        more = len(self.dropped) - MAX_REPORTED
        return ", ".join(self.dropped[:MAX_REPORTED]) + (f" and {more} more" if more > 0 else "")


def labels_from_query(items: Iterable[tuple[str, str]]) -> Labels:
    """Query parameters → labels: the first value of each key decides (a later repeat never
    overrides it, even when the first is malformed); `mac` and `uuid` normalised; malformed
    reserved labels and unusable keys are dropped (and reported), never guessed."""
    out = Labels()
    seen: set[str] = set()  # a set, not a scan of `dropped`: a query may repeat thousands of keys
    for key, value in items:
        if key in seen:
            continue
        seen.add(key)
        if not value:
            continue  # `hostname=` from an iPXE variable the firmware left empty: no label
        if not _LABEL_KEY.fullmatch(key) or len(value) > MAX_LABEL_VALUE:
            out.dropped.append(f"{_shown(key[:64])}={_shown(value[:64])}")
            continue
        norm = normalize_label(key, value)
        if norm is None:
            out.dropped.append(f"{key}={_shown(value[:64])}")
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
    extra = f" (ignored malformed {labels.dropped_text()})" if labels.dropped else ""
    raise NoMatch(f"no group matches {labels.text()}{extra}; {len(ordered)} group(s) tried, none is a default group")
