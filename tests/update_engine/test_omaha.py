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
