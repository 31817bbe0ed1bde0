"""provision.model / provision.select on their own: label normalisation and group selection.

Selection is checked against a brute-force reading of the rule (matchbox's): among the groups
whose selectors all equal the request's labels, one with the most selectors wins; ties go to the
smallest sorted `k=v,...` text, then the smallest id; the order the groups were listed in never
matters. Hypothesis draws the groups, the labels and the listing order.
"""

from __future__ import annotations

import random
import re
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provision.model import BadLabel, ModelError, normalize_label, normalize_mac, normalize_uuid, parse_group
from provision.select import Labels, NoMatch, labels_from_query, select, selection_order

CANON_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


# --- MAC addresses ---------------------------------------------------------------------------------

def _forms(raw: bytes) -> list[str]:
    """Every spelling a boot program or an operator uses for one MAC."""
    h = raw.hex()
    pairs = [h[i:i + 2] for i in range(0, 12, 2)]
    return [":".join(pairs), "-".join(pairs), ".".join(h[i:i + 4] for i in range(0, 12, 4)), h]


@pytest.mark.parametrize("spelling", [
    "52:54:00:ab:cd:ef", "52-54-00-ab-cd-ef", "5254.00ab.cdef", "525400abcdef",
    "52:54:00:AB:CD:EF", "52-54-00-Ab-cD-eF", "5254.00AB.CDEF", "525400ABCDEF", "  52:54:00:ab:cd:ef\n",
])
def test_mac_spellings_normalise_to_one_form(spelling: str) -> None:
    assert normalize_mac(spelling) == "52:54:00:ab:cd:ef"
    assert normalize_label("mac", spelling) == "52:54:00:ab:cd:ef"


@given(st.binary(min_size=6, max_size=6), st.randoms(use_true_random=False))
def test_mac_every_form_and_case_is_the_same_mac(raw: bytes, rnd: random.Random) -> None:
    canon = ":".join(f"{b:02x}" for b in raw)
    for form in _forms(raw):
        mixed = "".join(c.upper() if rnd.random() < 0.5 else c for c in form)
        assert normalize_mac(mixed) == canon
    assert CANON_MAC.match(canon)


BAD_MACS = [
    "", "zz:zz:zz:zz:zz:zz", "52:54:00:12:34", "52:54:00:12:34:56:78", "52:54-00:12:34:56",  # mixed separators
    "5254.0012.3456.", "5254:0012:3456", "52545400123456", "0x525400123456", "52:54:00:12:34:5g",
    "\uff15\uff12:54:00:12:34:56", "52 54 00 12 34 56", "52::54:00:12:34:56",
    "5:2:5:4:0:0", "52:54:00:12:34:56/24", "${mac:hexhyp}", "%52:54:00:12:34:56",
    "52:54:00:12:34:\u0665\u0666",  # Arabic-Indic digits: not hex for a MAC
]


@pytest.mark.parametrize("bad", BAD_MACS)
def test_garbage_mac_is_dropped_and_reported(bad: str) -> None:
    assert normalize_mac(bad) is None
    labels = labels_from_query([("mac", bad), ("os", "installed")])
    assert "mac" not in labels.values
    assert labels.values == {"os": "installed"}
    if bad:  # an empty value is no label at all, not a malformed one
        assert len(labels.dropped) == 1 and labels.dropped[0].startswith("mac=")


@given(st.text(max_size=40))
def test_mac_normaliser_never_invents_digits(text: str) -> None:
    """Whatever comes in, the answer is None or exactly the 12 hex digits that were given, in order."""
    out = normalize_mac(text)
    if out is not None:
        assert CANON_MAC.match(out)
        assert re.sub(r"[^0-9a-f]", "", text.lower()) == out.replace(":", "")


# --- UUIDs -----------------------------------------------------------------------------------------

@given(st.uuids(), st.sampled_from(["plain", "upper", "braces", "urn", "bare", "BARE"]))
def test_uuid_spellings_normalise(u: uuid.UUID, form: str) -> None:
    spelled = {"plain": str(u), "upper": str(u).upper(), "braces": "{" + str(u) + "}",
               "urn": u.urn, "bare": u.hex, "BARE": u.hex.upper()}[form]
    assert normalize_uuid(spelled) == str(u)
    assert normalize_label("uuid", " " + spelled + " ") == str(u)


BAD_UUIDS = [
    "", "not-a-uuid", "12345678-1234-1234-1234-12345678", "12345678-1234-1234-1234-123456789abcd",
    "0000_000-0000-0000-0000-000000000000",  # int(..., 16) accepts '_'; a label must not
    "1234-5678-1234-1234-1234-56789abc",  # hyphens in the wrong places
    "12345678-1234-1234-1234123456789abc",  # some hyphens, not all
    "{12345678-1234-1234-1234-123456789abc",  # unbalanced brace
    "\uff11\uff12345678-1234-1234-1234-123456789abc",  # full-width digits
    "g2345678-1234-1234-1234-123456789abc", "${uuid}", "12345678-1234-1234-1234-123456789abc-",
]


@pytest.mark.parametrize("bad", BAD_UUIDS)
def test_garbage_uuid_is_dropped(bad: str) -> None:
    assert normalize_uuid(bad) is None
    labels = labels_from_query([("uuid", bad)])
    assert labels.values == {}
    assert bool(labels.dropped) == bool(bad)


# --- labels from a query ---------------------------------------------------------------------------

def test_first_value_of_a_key_decides_even_when_malformed() -> None:
    assert labels_from_query([("mac", "52:54:00:12:34:56"), ("mac", "52:54:00:99:99:99")]).values == \
        {"mac": "52:54:00:12:34:56"}
    # A malformed first value is not replaced by a later well-formed one: "first value" has one meaning.
    labels = labels_from_query([("mac", "zz"), ("mac", "52:54:00:12:34:56")])
    assert labels.values == {} and labels.dropped == ["mac=zz"]
    assert labels_from_query([("hostname", ""), ("hostname", "node9")]).values == {}


@pytest.mark.parametrize(("key", "value"), [
    ("MAC", "52:54:00:12:34:56"), ("", "x"), ("a b", "x"), ("-lead", "x"), ("k" * 65, "x"), ("über", "x"),
    ("os", "v" * 257), ("a\nb", "x"), ("a=b", "c"), ("%2e", "x"),
])
def test_odd_keys_and_huge_values_are_dropped_and_reported(key: str, value: str) -> None:
    labels = labels_from_query([(key, value), ("role", "worker")])
    assert labels.values == {"role": "worker"}
    assert len(labels.dropped) == 1
    assert "\n" not in labels.dropped[0] and len(labels.dropped[0]) < 300


# Every way a value can start a new line in YAML (1.1 or 1.2), a shell or a boot script, and the
# other control characters: the request is refused (400), never served with or without the label.
LINE_BREAKERS = ["\n", "\r", "\r\n", "\t", "\x00", "\x0b", "\x0c", "\x1b[31m", "\x7f", "\x85", "\x9b",
                 "\u2028", "\u2029"]


@pytest.mark.parametrize("bad", LINE_BREAKERS, ids=[repr(b) for b in LINE_BREAKERS])
@pytest.mark.parametrize("key", ["hostname", "role", "mac", "uuid"])
def test_a_label_with_a_control_character_or_line_break_is_refused(key: str, bad: str) -> None:
    for value in (f"evil{bad}ssh_authorized_keys: [x]", bad, f"52:54:00:12:34:56{bad}"):
        with pytest.raises(BadLabel) as exc:
            labels_from_query([("os", "installed"), (key, value)])
        msg = str(exc.value)
        assert msg.isprintable() and f"label {key!r}" in msg and f"U+{ord(bad[0]):04X}" in msg, msg


def test_a_later_repeat_or_an_unusable_key_is_not_refused() -> None:
    """Only what could reach a template is checked: the first value of a usable key."""
    assert labels_from_query([("role", "a"), ("role", "b\nc")]).values == {"role": "a"}
    labels = labels_from_query([("a\nb", "x"), ("%00", "y\n"), ("role", "worker")])
    assert labels.values == {"role": "worker"} and len(labels.dropped) == 2


def test_printable_unicode_in_labels_is_kept() -> None:
    """Not every non-ASCII character is a control: accents, a bidi mark or a zero-width space pass as sent."""
    values = ["caf\u00e9", "\u202eevil", "a\u200bb", "\u00a0nbsp", "\U0001f600"]
    assert labels_from_query([(f"k{i}", v) for i, v in enumerate(values)]).values == \
        {f"k{i}": v for i, v in enumerate(values)}


def test_control_characters_never_reach_a_message_raw() -> None:
    labels = labels_from_query([("role", "a b"), ("mac", "zz INJECT")])
    with pytest.raises(NoMatch) as exc:
        select([], labels)
    msg = str(exc.value)
    assert msg.isprintable(), msg
    assert "mac=zz INJECT" in msg
    # Dropped keys may hold anything; their text in messages is escaped.
    labels = labels_from_query([("bad\nkey", "v\x1b[31m")])
    assert labels.dropped == ["bad\\nkey=v\\x1b[31m"]


def test_thousands_of_repeated_keys_are_cheap_and_reported_briefly() -> None:
    items = [(f"BAD{i}", "x") for i in range(3000)] + [("BAD0", "y")] * 3000 + [("os", "installed")]
    t0 = time.monotonic()
    labels = labels_from_query(items)
    assert time.monotonic() - t0 < 1.0
    assert labels.values == {"os": "installed"} and len(labels.dropped) == 3000
    assert labels.dropped_text().endswith("and 2992 more")
    with pytest.raises(NoMatch) as exc:
        select([], labels)
    assert len(str(exc.value)) < 1000


@given(st.lists(st.tuples(st.text(max_size=12), st.text(max_size=300)), max_size=20))
def test_any_query_gives_clean_labels(items: list[tuple[str, str]]) -> None:
    try:
        labels = labels_from_query(items)
    except BadLabel as exc:
        key = str(exc).split("'")[1]
        first = next(val for k, val in items if k == key)
        assert re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029]", first), (key, first)
        return
    for k, v in labels.values.items():
        assert re.match(r"^[a-z0-9][a-z0-9_.-]{0,63}$", k) and 0 < len(v) <= 256
        if k == "mac":
            assert CANON_MAC.match(v)
        if k == "uuid":
            assert v == str(uuid.UUID(v))
        if k not in ("mac", "uuid"):
            assert v == next(val for key, val in items if key == k)  # the first value, as sent
    assert labels.text().isprintable() and labels.dropped_text().isprintable()


# --- groups ----------------------------------------------------------------------------------------

def test_group_selector_mac_and_uuid_normalised_on_load() -> None:
    g = parse_group({"profile": "p", "selector": {"mac": "52-54-00-AB-CD-EF", "uuid": "{" + "A" * 32 + "}"}},
                    ident="g")
    assert g.selector == {"mac": "52:54:00:ab:cd:ef", "uuid": str(uuid.UUID("a" * 32))}
    assert g.matches(labels_from_query([("mac", "525400abcdef"), ("uuid", "a" * 32)]).values)


@pytest.mark.parametrize("data", [
    {"profile": "p", "selector": {"mac": "zz"}},
    {"profile": "p", "selector": {"uuid": "nope"}},
    {"profile": "p", "selector": {"MAC": "52:54:00:12:34:56"}},
    {"profile": "p", "selector": {"os": ""}},
    {"profile": "p", "selector": {"os": "x" * 257}},
    {"profile": "bad id"},
    {"profile": "p", "colour": "red"},
    {"profile": "p", "id": "other"},
    [],
])
def test_bad_groups_refused_with_a_reason(data: object) -> None:
    with pytest.raises(ModelError) as exc:
        parse_group(data, ident="g")
    assert str(exc.value) and "\n" not in str(exc.value)


def _group(ident: str, **selector: str) -> object:
    return parse_group({"profile": "p", "selector": selector}, ident=ident)


def test_most_specific_group_wins_and_default_catches_the_rest() -> None:
    groups = [_group("default"), _group("installed", os="installed"),
              _group("node1", mac="52:54:00:12:34:56"), _group("node1-installed", mac="52:54:00:12:34:56",
                                                                os="installed")]
    order = selection_order(groups)

    def pick(*items: tuple[str, str]) -> str:
        return select(order, labels_from_query(items)).id

    assert pick(("mac", "52-54-00-12-34-56"), ("os", "installed")) == "node1-installed"
    assert pick(("mac", "52:54:00:12:34:56")) == "node1"
    assert pick(("os", "installed"), ("mac", "52:54:00:00:00:01")) == "installed"
    assert pick(("mac", "52:54:00:00:00:01")) == "default"
    assert pick() == "default"
    assert pick(("mac", "garbage")) == "default"  # a dropped label is no label, so the default answers


def test_no_match_names_the_labels_and_the_dropped_ones() -> None:
    order = selection_order([_group("node1", mac="52:54:00:12:34:56")])
    with pytest.raises(NoMatch) as exc:
        select(order, labels_from_query([("mac", "52:54:00:00:00:01"), ("os", "x"), ("uuid", "junk")]))
    msg = str(exc.value)
    assert "mac=52:54:00:00:00:01" in msg and "os=x" in msg and "uuid=junk" in msg
    assert "none is a default group" in msg and "1 group(s)" in msg
    with pytest.raises(NoMatch, match="no labels"):
        select(order, Labels())


def test_tie_between_equally_specific_groups_does_not_depend_on_listing_order() -> None:
    a, b = _group("zeta", mac="52:54:00:12:34:56"), _group("alpha", os="installed")
    labels = labels_from_query([("mac", "52:54:00:12:34:56"), ("os", "installed")])
    winners = {select(selection_order(p), labels).id for p in ([a, b], [b, a])}
    assert winners == {"zeta"}  # "mac=..." sorts before "os=...": the selector text decides, not the id
    same1, same2 = _group("b-group", os="installed"), _group("a-group", os="installed")
    winners = {select(selection_order(p), labels).id for p in ([same1, same2], [same2, same1])}
    assert winners == {"a-group"}  # identical selectors: the id decides


# Small alphabets, so groups often overlap, tie and match.
KEYS = ["mac", "os", "region", "rack"]
VALUES = {"mac": ["52:54:00:00:00:01", "52:54:00:00:00:02"], "os": ["installed", "live"],
          "region": ["eu", "us"], "rack": ["1", "2"]}


@st.composite
def _selector(draw: st.DrawFn) -> dict[str, str]:
    keys = draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=len(KEYS)))
    return {k: draw(st.sampled_from(VALUES[k])) for k in keys}


def _brute_force(groups: list, labels: dict[str, str]) -> str | None:
    matching = [g for g in groups if all(labels.get(k) == v for k, v in g.selector.items())]
    if not matching:
        return None
    most = max(len(g.selector) for g in matching)
    best = [g for g in matching if len(g.selector) == most]
    return min(best, key=lambda g: (",".join(f"{k}={v}" for k, v in sorted(g.selector.items())), g.id)).id


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_selector(), max_size=8), _selector(), st.randoms(use_true_random=False))
def test_selection_equals_brute_force_in_any_order(selectors: list[dict[str, str]], want: dict[str, str],
                                                  rnd: random.Random) -> None:
    groups = [_group(f"g{i}", **sel) for i, sel in enumerate(selectors)]
    labels = labels_from_query(list(want.items()) + [("extra", "ignored")])
    expect = _brute_force(groups, labels.values)
    for _ in range(3):
        shuffled = groups[:]
        rnd.shuffle(shuffled)
        if expect is None:
            with pytest.raises(NoMatch):
                select(selection_order(shuffled), labels)
        else:
            got = select(selection_order(shuffled), labels)
            assert got.id == expect
            assert got.matches(labels.values)
