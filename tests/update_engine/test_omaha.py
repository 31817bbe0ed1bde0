"""Omaha v3 codec: Flatcar's request shape, Nebraska's response shape, and a fuzz of both parsers."""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from update_engine import omaha
from update_engine.omaha import Event, OmahaError

APPID = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"

# A response as Nebraska sends it for a Flatcar package (shape from its omaha.go / go-omaha fixtures).
NEBRASKA = b"""<?xml version="1.0" encoding="UTF-8"?>
<response protocol="3.0" server="nebraska">
 <daystart elapsed_seconds="0"></daystart>
 <app appid="{e96281a6-d1af-4bde-9a0a-97b76e56dc57}" status="ok">
  <ping status="ok"></ping>
  <updatecheck status="ok">
   <urls><url codebase="https://update.release.flatcar-linux.net/amd64-usr/3815.2.0"></url></urls>
   <manifest version="3815.2.0">
    <packages><package name="flatcar_production_update.gz" hash="3HDZ5M2FhkDSPjOfBzd3XqtwqdE=" size="465881871"
      required="true"></package></packages>
    <actions><action event="postinstall" sha256="K6DApIzCjGWrZ0xYcoCxRSkOf0o1bCAAJWyg5DRG7dg=" needsadmin="false"
      IsDeltaPayload="false" DisablePayloadBackoff="true" ChromeOSVersion=""></action></actions>
   </manifest>
  </updatecheck>
 </app>
</response>"""


def test_request_has_flatcar_attributes() -> None:
    req = omaha.Request(omaha.AppRequest(
        appid=APPID, version="1.2.3", track="stable", machineid="ab" * 16, bootid="{x}", board="amd64-usr",
        ping=True, updatecheck=True, events=[Event(3, 2, previousversion="1.2.2")]))
    xml = omaha.build_request(req)
    root = ET.fromstring(xml)
    assert root.attrib["protocol"] == "3.0" and root.attrib["installsource"] == "scheduler"
    assert root.attrib["ismachine"] == "1"
    app = root.find("app")
    for k in ("appid", "version", "track", "bootid", "oem", "oemversion", "alephversion", "machineid",
              "machinealias", "lang", "board", "hardware_class", "delta_okay"):
        assert k in app.attrib
    assert app.find("ping").attrib == {"active": "1"} and app.find("updatecheck") is not None
    assert app.find("event").attrib == {"eventtype": "3", "eventresult": "2", "previousversion": "1.2.2"}
    back = omaha.parse_request(xml)
    assert back.app.track == "stable" and back.app.events == [Event(3, 2, None, "1.2.2")]
    err = omaha.build_request(omaha.Request(omaha.AppRequest(APPID, "1", "s", events=[Event(3, 0, 44)])))
    assert b'<event eventtype="3" eventresult="0" errorcode="44"></event>' in err


def test_parses_nebraska_response() -> None:
    r = omaha.parse_response(NEBRASKA)
    u = r.update
    assert r.status == "ok" and u.version == "3815.2.0" and u.size == 465881871
    assert u.urls == ["https://update.release.flatcar-linux.net/amd64-usr/3815.2.0/flatcar_production_update.gz"]
    assert len(u.sha256) == 64 and u.disable_payload_backoff and not u.is_delta


def test_round_trip_and_noupdate() -> None:
    u = omaha.Update("1.10.0", [], "update.payload", 1234, "ab" * 32, sha1_b64="x")
    r = omaha.parse_response(omaha.build_response(APPID, update=u, codebase="http://h/p/1.10.0", poll_interval=60))
    assert r.update.urls == ["http://h/p/1.10.0/update.payload"] and r.update.sha256 == "ab" * 32
    assert r.poll_interval == 60
    assert omaha.parse_response(omaha.build_response(APPID)).update is None
    with pytest.raises(OmahaError, match="error-unknownApplication"):
        omaha.parse_response(omaha.build_response(APPID, app_status="error-unknownApplication",
                                                  updatecheck="error-internal"))


@pytest.mark.parametrize("bad", [
    b"", b"<response", b"<html>502</html>", b'<response protocol="3.0"></response>',
    b'<response><app status="ok"><updatecheck status="weird"/></app></response>',
    b'<response><app status="ok"><updatecheck status="ok"><manifest/></updatecheck></app></response>',
    b'<!DOCTYPE x [<!ENTITY a "aaaa">]><response>&a;</response>',
    NEBRASKA.replace(b'size="465881871"', b'size="-1"'),
    NEBRASKA.replace(b'sha256="K6D', b'sha256="!!!'),
    NEBRASKA.replace(b'event="postinstall"', b'event="preinstall"'),
])
def test_malformed_responses(bad: bytes) -> None:
    with pytest.raises(OmahaError) as ei:
        omaha.parse_response(bad)
    assert ei.value.code == omaha.ERR_OMAHA_INVALID


def test_versions() -> None:
    assert omaha.compare_versions("1.10.0", "1.9.0") == 1
    assert omaha.compare_versions("1.2", "1.2.0") == 0
    assert omaha.compare_versions("3815.2.0", "3815.2.1") == -1


_xmlish = st.text(alphabet=st.sampled_from(list('<>/="?! abcdeprsonutkl&;#x0123456789\n')), max_size=300)


@settings(max_examples=400, deadline=None)
@given(junk=_xmlish, raw=st.binary(max_size=200), cut=st.integers(0, len(NEBRASKA)))
def test_fuzz_parsers_never_crash(junk: str, raw: bytes, cut: int) -> None:
    for data in (junk.encode(), raw, NEBRASKA[:cut] + raw, NEBRASKA[:cut] + junk.encode() + NEBRASKA[cut:]):
        for parse in (omaha.parse_response, omaha.parse_request):
            with contextlib.suppress(OmahaError):
                parse(data)


# ---------------------------------------------------------------- hostile XML (defusedxml refuses declarations)

_REQ = omaha.build_request(omaha.Request(omaha.AppRequest(APPID, "1.0.0", "stable", updatecheck=True)))
_LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
           + b"".join(b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
                      for i in range(1, 10))
           + b']><response protocol="3.0">&lol9;</response>')


def _utf16(doc: bytes) -> bytes:
    return doc.decode().replace('encoding="UTF-8"', 'encoding="UTF-16"').encode("utf-16")


def _entity(doc: bytes) -> bytes:
    """``doc`` with a DTD declaring an internal entity that a text node uses."""
    head, _, rest = doc.partition(b"?>")
    return head + b'?><!DOCTYPE x [<!ENTITY e "expanded">]>' + rest.replace(b'version="', b'version="&e;', 1)


HOSTILE_XML = {
    "UTF-16 response with an entity": (_utf16(_entity(NEBRASKA)), omaha.parse_response),
    "UTF-16 request with an entity": (_utf16(_entity(_REQ)), omaha.parse_request),
    "DOCTYPE after 4 KiB of whitespace": (NEBRASKA.replace(b"?>", b"?>" + b" " * 5000 + b"<!DOCTYPE x []>", 1),
                                          omaha.parse_response),
    "DOCTYPE after 4 KiB of comments": (b'<?xml version="1.0"?>' + b"<!-- pad -->" * 500
                                        + b'<!DOCTYPE request [<!ELEMENT request ANY>]><request protocol="3.0">'
                                        + b'<app appid="a"/></request>', omaha.parse_request),
    "billion laughs in UTF-16": (_LAUGHS.decode().replace('"1.0"?>', '"1.0" encoding="UTF-16"?>', 1).encode("utf-16"),
                                 omaha.parse_response),
    "billion laughs": (_LAUGHS, omaha.parse_response),
    "external entity": (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                        b'<response protocol="3.0">&x;</response>', omaha.parse_response),
    "external DTD": (b'<?xml version="1.0"?><!DOCTYPE r SYSTEM "http://127.0.0.1:1/x.dtd"><request protocol="3.0">'
                     b'<app appid="a"/></request>', omaha.parse_request),
    "parameter entity": (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY % p "x"> %p;]><response/>',
                         omaha.parse_response),
    "UTF-32 with a DTD": ('<?xml version="1.0" encoding="UTF-32"?><!DOCTYPE r []><response/>'.encode("utf-32"),
                          omaha.parse_response),
}


@pytest.mark.parametrize("case", list(HOSTILE_XML))
def test_dtds_and_entities_refused_in_any_encoding_anywhere(case: str) -> None:
    data, parse = HOSTILE_XML[case]
    with pytest.raises(OmahaError) as ei:
        parse(data)
    assert ei.value.code == omaha.ERR_OMAHA_INVALID
    assert "DTD" in str(ei.value) or "well-formed" in str(ei.value), str(ei.value)


def test_utf16_without_declarations_still_parses() -> None:
    assert omaha.parse_response(_utf16(NEBRASKA)).update.version == "3815.2.0"
    assert omaha.parse_request(_utf16(_REQ)).app.appid == APPID


def _offer(**kw) -> bytes:
    u = omaha.Update(kw.pop("version", "1.10.0"), [], kw.pop("name", "update.payload"), 1234, "ab" * 32)
    return omaha.build_response(APPID, update=u, codebase=kw.pop("codebase", "http://h/p"), **kw)


HOSTILE_OFFERS = {
    "file codebase": (lambda: _offer(codebase="file:///etc"), "http(s)"),
    "bare path codebase": (lambda: _offer(codebase="/var/lib/obelisk"), "http(s)"),
    "ftp codebase": (lambda: _offer(codebase="ftp://h/p"), "http(s)"),
    "no host": (lambda: _offer(codebase="http:///p"), "http(s)"),
    "credentials in codebase": (lambda: _offer(codebase="https://user:secret@h/p"), "credentials"),
    "bad port": (lambda: _offer(codebase="http://h:99999/p"), "malformed"),
    "space in codebase": (lambda: _offer(codebase="http://h/a b"), "spaces"),
    "huge codebase": (lambda: _offer(codebase="http://h/" + "a" * 5000), "longer than"),
    "package name with a slash": (lambda: _offer(name="../../etc/x"), "plain file name"),
    "huge version": (lambda: _offer(version="1." * 40_000 + "0"), "not a version"),
    "version with junk": (lambda: _offer(version="1.2.3;rm -rf"), "not a version"),
    "many urls": (lambda: _offer().replace(b"<urls>", b"<urls>" + b'<url codebase="http://h/x"></url>' * 100),
                  "at most 16"),
    "negative size": (lambda: _offer().replace(b'size="1234"', b'size="-5"'), "invalid payload size"),
    "huge size": (lambda: _offer().replace(b'size="1234"', b'size="' + b"9" * 30 + b'"'), "not an integer"),
    "huge app status": (lambda: omaha.build_response(APPID, app_status="error-" + "x" * 500_000), "refused the app"),
}


@pytest.mark.parametrize("case", list(HOSTILE_OFFERS))
def test_offers_the_host_must_not_follow(case: str) -> None:
    make, words = HOSTILE_OFFERS[case]
    with pytest.raises(OmahaError) as ei:
        omaha.parse_response(make())
    assert words in str(ei.value) and ei.value.code == omaha.ERR_OMAHA_INVALID, str(ei.value)
    assert len(str(ei.value)) < 300  # what the server sent is cut, not copied into the state and the log


def test_poll_interval_is_bounded() -> None:
    """A PollInterval of 10^18 s made the scheduler's wait raise OverflowError (no check ever again)."""
    r = omaha.parse_response(omaha.build_response(APPID, poll_interval=10**18))
    assert r.poll_interval == omaha.MAX_POLL_INTERVAL
    assert omaha.parse_response(_offer(poll_interval=3600)).poll_interval == 3600
