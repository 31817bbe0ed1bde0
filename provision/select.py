"""Which group a host belongs to: labels from the request, the most specific matching group wins."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from obelisk.errors import ObeliskError
from provision.model import _LABEL_KEY, MAX_LABEL_VALUE, Group, check_label_text, normalize_label

log = logging.getLogger("obelisk.provision")


class NoMatch(ObeliskError, LookupError):
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
    reserved labels and unusable keys are dropped (and reported), never guessed. A value with a
    control character or line break raises BadLabel: the request is refused, not served without it."""
    out = Labels()
    seen: set[str] = set()  # a set, not a scan of `dropped`: a query may repeat thousands of keys
    for key, value in items:
        if key in seen:
            continue
        seen.add(key)
        if not value:
            continue  # `hostname=` from an iPXE variable the firmware left empty: no label
        key_ok = _LABEL_KEY.fullmatch(key) is not None
        if key_ok:
            check_label_text(key, value)
        if not key_ok or len(value) > MAX_LABEL_VALUE:
            out.dropped.append(f"{_shown(key[:64])}={_shown(value[:64])}")
            continue
        norm = normalize_label(key, value)
        if norm is None:
            out.dropped.append(f"{key}={_shown(value[:64])}")
            log.warning("ignoring malformed label %s=%r", key, value[:64])
            continue
        out.values[key] = norm
    return out


class Ordered(list[Group]):
    """Groups in selection order, with the groups that select by MAC alone indexed by that MAC: a
    fleet of one group per host then costs a dict lookup per request, not a scan of every group."""

    def __init__(self, groups: Iterable[Group]) -> None:
        super().__init__(groups)
        self.by_mac: dict[str, int] = {}  # MAC -> position of the first MAC-only group for it
        self.others: list[tuple[int, Group]] = []  # every other group, with its position
        for pos, g in enumerate(self):
            if len(g.selector) == 1 and "mac" in g.selector:
                self.by_mac.setdefault(g.selector["mac"], pos)
            else:
                self.others.append((pos, g))


def selection_order(groups: Iterable[Group]) -> Ordered:
    """Most selectors first; among equals, by selector text then id, so the choice never depends on
    the order files were listed in."""
    return Ordered(sorted(groups, key=lambda g: (-g.specificity, g.selector_text(), g.id)))


def select(ordered: list[Group], labels: Labels) -> Group:
    """The first group in ``ordered`` (selection order, best an `Ordered`) whose selector matches."""
    idx = ordered if isinstance(ordered, Ordered) else Ordered(ordered)
    mac = labels.values.get("mac")
    hit = idx.by_mac.get(mac, len(idx)) if mac is not None else len(idx)
    # A MAC-only group can match only through its MAC, so the winner is the first matching group
    # among the others that come before the indexed one, or else the indexed one.
    for pos, g in idx.others:
        if pos > hit:
            break
        if g.matches(labels.values):
            return g
    if hit < len(idx):
        return idx[hit]
    extra = f" (ignored malformed {labels.dropped_text()})" if labels.dropped else ""
    raise NoMatch(f"no group matches {labels.text()}{extra}; {len(idx)} group(s) tried, none is a default group")
