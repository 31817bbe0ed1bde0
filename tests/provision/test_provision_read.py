"""The read side of `obelisk provision serve`, over real HTTP on loopback (uvicorn, no mocks).

Every request that must be sent exactly as written (`..`, `%2e%2e`, `//`, backslashes, hostile
Host headers) goes through a raw socket: requests and curl would normalise the path first.
"""

from __future__ import annotations

import json
import random
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from prov_helpers import Served
from testlib import OBELISK, need_tools

NODE1 = "52:54:00:12:34:56"
ROOT_HASH_OLD = "1" * 64
ROOT_HASH_NEW = "ab" * 32
SECRET = "TOPSECRET-d41d8cd9"


# --- helpers ---------------------------------------------------------------------------------------

@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def raw(served: Served, target: str | bytes, *, method: str = "GET", host: str | bytes | None = None,
        headers: dict[str, str] | None = None) -> Reply:
    """One request with the target and Host header sent byte for byte as given."""
    t = target.encode() if isinstance(target, str) else target
    h = (host if host is not None else f"127.0.0.1:{served.port}")
    h = h.encode("latin-1") if isinstance(h, str) else h
    lines = [method.encode() + b" " + t + b" HTTP/1.1", b"Host: " + h, b"Connection: close"]
    lines += [f"{k}: {v}".encode() for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as s:
        s.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    if "content-length" in hdrs:
        assert len(body) == int(hdrs["content-length"]) or method == "HEAD"
    return Reply(int(status_line.split()[1]), hdrs, body)


def put(data: Path, rel: str, value: object) -> None:
    path = data / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n" if not isinstance(value, str) else value)


def make_release(assets: Path, name: str, version: str, root_hash: str, offset: int, *,
                 files: tuple[str, ...] = ("vmlinuz", "initrd")) -> dict[str, bytes]:
    """A release folder as `obelisk image build --format raw,pxe` publishes it (only what the
    server reads: release.json with the verity root hash and offset, the kernel and the initrd)."""
    d = assets / name / version
    d.mkdir(parents=True)
    (d / "release.json").write_text(json.dumps({"name": name, "version": version, "format": 1,
                                                "verity_root_hash": root_hash, "hash_offset": offset}))
    rnd = random.Random(f"{name}/{version}")
    out = {}
    for f in files:
        out[f] = rnd.randbytes(300_000 if f == "vmlinuz" else 40_000)
        (d / f).write_bytes(out[f])
    return out


@pytest.fixture
def assets(tmp_path: Path) -> Path:
    a = tmp_path / "assets"
    make_release(a, "tiny", "0.9.0", ROOT_HASH_OLD, 4096)
    make_release(a, "tiny", "0.10.0", ROOT_HASH_NEW, 18386944)  # newest by version, not by string
    return a


def one_line_error(r: Reply) -> str:
    """Failures answer exactly one printable line, `error: ...`."""
    text = r.text
    assert text.startswith("error: ") and text.endswith("\n") and text.count("\n") == 1, text
    assert text[:-1].isprintable(), text
    return text


def clean_log(served: Served) -> None:
    log = served.log_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


def metadata(served: Served, query: str) -> dict[str, str]:
    r = raw(served, f"/metadata?{query}")
    assert r.status == 200, r.text
    return dict(line.split("=", 1) for line in r.text.splitlines())


# --- selection -------------------------------------------------------------------------------------

def test_most_specific_group_wins_default_catches_rest_and_404_without_default(data: Path, assets: Path,
                                                                               serve) -> None:  # noqa: ANN001
    meta = {"update_group": "stable", "reboot_strategy": "off", "etcd_endpoints": "http://10.0.0.11:2379"}
    put(data, "groups/installed.json", {"profile": "tiny", "selector": {"os": "installed"},
                                         "metadata": {**meta, "role": "installed"}})
    put(data, "groups/node1-installed.json", {"profile": "tiny", "selector": {"mac": NODE1, "os": "installed"},
                                               "metadata": {**meta, "role": "node1-installed"}})
    put(data, "groups/rack2.json", {"profile": "tiny", "selector": {"rack": "2"},
                                    "metadata": {**meta, "role": "rack2"}})
    s = serve(data, "--assets", str(assets))

    def role(query: str) -> str:
        return metadata(s, query)["ROLE"]

    assert role("mac=52-54-00-12-34-56&os=installed") == "node1-installed"
    assert role("os=installed&mac=5254.0012.3456") == "node1-installed"  # order and MAC spelling do not matter
    assert role("mac=52:54:00:12:34:56") == "etcd"  # node1
    assert role("MAC=52:54:00:12:34:56") == "worker"  # label keys are case-sensitive, as in matchbox
    assert role("mac=52:54:00:12:34:56&os=live") == "etcd"
    assert role("os=installed&mac=52:54:00:00:00:01") == "installed"
    # Two one-selector groups match: the tie goes to the smaller selector text ("os=..." < "rack=...").
    assert role("rack=2&os=installed") == "installed"
    assert role("mac=52:54:00:00:00:01") == "worker"  # the default group
    assert role("") == "worker"
    assert role("mac=zz:zz") == "worker"

    meta_lines = metadata(s, "mac=52-54-00-12-34-56&hostname=h1")
    assert meta_lines["MAC"] == NODE1 and meta_lines["REQUEST_QUERY_MAC"] == NODE1
    assert meta_lines["REQUEST_QUERY_HOSTNAME"] == "h1" and meta_lines["HOSTNAME"] == "node1"

    # Without a default group, a host nothing selects gets a 404 that says why.
    (data / "groups" / "default.json").unlink()
    for path in ("/ipxe", "/grub", "/cloud", "/generic", "/metadata"):
        r = raw(s, f"{path}?mac=52:54:00:00:00:01&uuid=junk")
        assert r.status == 404, (path, r.text)
        line = one_line_error(r)
        assert "no group matches mac=52:54:00:00:00:01" in line and "uuid=junk" in line
        assert "none is a default group" in line
    assert raw(s, f"/ipxe?mac={NODE1}").status == 200
    assert "no group matches" in s.log_text()
    clean_log(s)


# --- boot scripts ----------------------------------------------------------------------------------

def test_ipxe_script_from_the_newest_release_and_its_assets_served(data: Path, assets: Path,
                                                                   serve) -> None:  # noqa: ANN001
    s = serve(data, "--assets", str(assets))
    r = raw(s, "/ipxe?mac=52-54-00-12-34-56")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    lines = r.text.splitlines()
    kernel = f"{s.url}/assets/tiny/0.10.0/vmlinuz"
    assert lines[0] == "#!ipxe" and lines[-1] == "boot" and len(lines) == 4
    words = lines[1].split(" ")
    assert words[:2] == ["kernel", kernel]
    assert words[2:5] == ["initrd=initrd", f"obelisk.usrhash={ROOT_HASH_NEW}", "obelisk.usrhashoffset=18386944"]
    assert {"console=ttyS0", "console=tty0", "panic=10"} <= set(words)
    # The firmware expands ${mac:hexhyp}; the server's own URL was rendered in.
    assert f"cloud-config-url={s.url}/cloud?mac=${{mac:hexhyp}}" in words
    assert lines[2] == f"initrd {s.url}/assets/tiny/0.10.0/initrd"

    # The URLs in the script serve the release's files.
    rel = assets / "tiny" / "0.10.0"
    for url, f in ((kernel, "vmlinuz"), (lines[2].split(" ")[1], "initrd")):
        got = raw(s, url[len(s.url):])
        assert got.status == 200 and got.body == (rel / f).read_bytes()

    # HEAD answers the headers only.
    h = raw(s, "/ipxe?mac=52-54-00-12-34-56", method="HEAD")
    assert h.status == 200 and h.body == b"" and int(h.headers["content-length"]) == len(r.body)

    for chain in ("/boot.ipxe", "/boot.ipxe.0"):
        b = raw(s, chain)
        assert b.status == 200
        assert b.text == ("#!ipxe\nchain ipxe?uuid=${uuid}&mac=${mac:hexhyp}&domain=${domain}&hostname=${hostname}"
                          "&serial=${serial}&arch=${buildarch:uristring}\n")
    clean_log(s)


def test_releases_pinned_missing_and_incomplete(data: Path, assets: Path, serve) -> None:  # noqa: ANN001
    make_release(assets, "noinitrd", "1.0.0", ROOT_HASH_NEW, 4096, files=("vmlinuz",))
    bad = assets / "badhash" / "1.0.0"
    make_release(assets, "badhash", "1.0.0", ROOT_HASH_NEW, 4096)
    (bad / "release.json").write_text(json.dumps({"version": "1.0.0", "verity_root_hash": "zz"}))
    for ident, release in (("pinned", "tiny/0.9.0"), ("ghost", "ghost"), ("noinitrd", "noinitrd"),
                           ("badhash", "badhash/1.0.0")):
        put(data, f"profiles/{ident}.json", {"release": release, "boot": {"args": ["quiet"]}})
        put(data, f"groups/{ident}.json", {"profile": ident, "selector": {"os": ident}})
    s = serve(data, "--assets", str(assets))

    r = raw(s, "/ipxe?os=pinned")
    assert r.status == 200
    assert f"kernel {s.url}/assets/tiny/0.9.0/vmlinuz initrd=initrd obelisk.usrhash={ROOT_HASH_OLD} " \
           f"obelisk.usrhashoffset=4096 quiet\n" in r.text
    assert f"initrd {s.url}/assets/tiny/0.9.0/initrd\n" in r.text

    for os_label, reason in (("ghost", "no release of 'ghost' under the assets folder; build one with "
                                       "'obelisk image build images/ghost.toml --format raw,pxe'"),
                             ("noinitrd", "release noinitrd/1.0.0 has no initrd: rebuild it with --format raw,pxe"),
                             ("badhash", "release.json lacks verity_root_hash or hash_offset")):
        for path in ("/ipxe", "/grub"):
            r = raw(s, f"{path}?os={os_label}")
            assert r.status == 404, r.text
            assert reason in one_line_error(r)
    clean_log(s)


def test_release_needs_an_assets_folder(data: Path, serve) -> None:  # noqa: ANN001
    s = serve(data)  # the copied example has no assets link
    r = raw(s, f"/ipxe?mac={NODE1}")
    assert r.status == 404
    assert "release 'tiny' needs an assets folder; start the server with --assets" in one_line_error(r)
    r = raw(s, "/assets/tiny/0.10.0/vmlinuz")
    assert r.status == 404 and "no assets folder" in one_line_error(r)
    clean_log(s)


def _grub_check(script: str, tmp_path: Path) -> None:
    f = tmp_path / "grub.cfg"
    f.write_text(script)
    res = subprocess.run(["grub-script-check", str(f)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, f"grub-script-check: {res.stdout}{res.stderr}\n{script}"


def test_grub_script_passes_grub_script_check(data: Path, assets: Path, serve, tmp_path: Path) -> None:  # noqa: ANN001
    need_tools("grub-script-check")
    # The tool really rejects broken scripts, so a pass below means something.
    with pytest.raises(AssertionError):
        _grub_check("menuentry 'x' {\n  linux /k\n", tmp_path)

    # A manual profile (kernel and two initrds by URL) with a name full of GRUB's special characters.
    put(data, "profiles/manual.json", {
        "name": "it's \"manual\" {x}; $y & `z`",
        "boot": {"kernel": "/assets/tiny/0.9.0/vmlinuz",
                 "initrd": ["/assets/tiny/0.9.0/initrd", "http://other.example:8081/extra.img"],
                 "args": ["root=/dev/sda9", "note=a;b", "x=${mac:hexhyp}", "glob=a*b?[c]", "q='\"",
                          "url={{ server_url }}/cloud?mac=${mac:hexhyp}&uuid=${uuid}"]}})
    put(data, "groups/manual.json", {"profile": "manual", "selector": {"os": "manual"}})
    s = serve(data, "--assets", str(assets))
    dev = f"(http,127.0.0.1:{s.port})"

    r = raw(s, "/grub?mac=52-54-00-12-34-56")
    assert r.status == 200
    _grub_check(r.text, tmp_path)
    assert r.text.startswith("default=0\ntimeout=1\nmenuentry 'obelisk tiny over PXE' {\n")
    assert f"  linux '{dev}/assets/tiny/0.10.0/vmlinuz' initrd=initrd obelisk.usrhash={ROOT_HASH_NEW} " \
           f"obelisk.usrhashoffset=18386944 " in r.text
    # GRUB cannot expand iPXE variables: the request's own labels stand in for them.
    assert f"'cloud-config-url={s.url}/cloud?mac=52-54-00-12-34-56'" in r.text
    assert f"  initrd '{dev}/assets/tiny/0.10.0/initrd'\n" in r.text

    r = raw(s, "/grub?os=manual&uuid=6B29FC40-CA47-1067-B31D-00DD010662DA")
    assert r.status == 200
    _grub_check(r.text, tmp_path)
    assert f"  linux '{dev}/assets/tiny/0.9.0/vmlinuz' root=/dev/sda9 'note=a;b' 'x=${{mac:hexhyp}}' " \
           f"'glob=a*b?[c]' " in r.text  # no MAC label: the variable stays, quoted so GRUB leaves it alone
    assert "uuid=6b29fc40-ca47-1067-b31d-00dd010662da" in r.text
    assert f"  initrd '{dev}/assets/tiny/0.9.0/initrd' '(http,other.example:8081)/extra.img'\n" in r.text

    r = raw(s, "/ipxe?os=manual")
    assert r.text.splitlines()[2:4] == [f"initrd {s.url}/assets/tiny/0.9.0/initrd",
                                        "initrd http://other.example:8081/extra.img"]
    clean_log(s)


# --- cloud-config, generic, metadata ---------------------------------------------------------------

def test_cloud_generic_and_metadata(data: Path, assets: Path, serve, tmp_path: Path) -> None:  # noqa: ANN001
    s = serve(data, "--assets", str(assets))

    for query, hostname, role in ((f"mac={NODE1}", "node1", "etcd"),
                                  ("mac=52-54-00-AA-BB-CC", "node-525400aabbcc", "worker")):
        r = raw(s, f"/cloud?{query}")
        assert r.status == 200, r.text
        assert r.text.startswith("#cloud-config\n")
        assert f'hostname: "{hostname}"\n' in r.text
        assert f'content: "role={role}\\nprovisioned_by={s.url}\\n"\n' in r.text
        # What the server serves is what `obelisk cloudconfig validate` accepts.
        f = tmp_path / f"{hostname}.yaml"
        f.write_bytes(r.body)
        res = subprocess.run([OBELISK, "cloudconfig", "validate", str(f)], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr

    r = raw(s, f"/generic?mac={NODE1}")
    assert r.status == 200 and r.text == f"# etcd host node1, from {s.url}\n"
    r = raw(s, "/generic?mac=52:54:00:aa:bb:cc")
    assert r.text == f"# worker host 52:54:00:aa:bb:cc, from {s.url}\n"

    # /metadata is env lines a shell (or systemd's EnvironmentFile=) reads back as sent, and a
    # hostile value never runs anything.
    pwned = tmp_path / "pwned"
    note = f"$(touch {pwned}) `touch {pwned}` \"q\" 'q' \\ $HOME ;&|"
    from urllib.parse import quote

    r = raw(s, f"/metadata?mac={NODE1}&note={quote(note, safe='')}&n2=a%0Ab")
    assert r.status == 400 and "label 'n2' has a control character or line break" in r.text, r.text
    r = raw(s, f"/metadata?mac={NODE1}&note={quote(note, safe='')}")
    assert r.status == 200
    env = tmp_path / "meta.env"
    env.write_bytes(r.body)
    out = subprocess.run(["sh", "-c", '. "$1" && printf "%s|%s|%s" "$REQUEST_QUERY_NOTE" "$ROLE" "$MAC"', "sh",
                          str(env)], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{note}|etcd|{NODE1}"
    assert not pwned.exists()
    assert all(re.match(r"^[A-Z0-9_]+=", line) for line in r.text.splitlines()), r.text
    assert "REQUEST_RAW_QUERY=" in r.text and "ETCD_ENDPOINTS=http://10.0.0.11:2379" in r.text
    clean_log(s)


# --- strict templating -----------------------------------------------------------------------------

def test_strict_templates_fail_whole_with_one_line(data: Path, assets: Path, serve) -> None:  # noqa: ANN001
    base = json.loads((data / "groups" / "default.json").read_text())["metadata"]
    put(data, "cloud/needs.yaml", "#cloud-config\nhostname: {{ missing_thing }}\n")
    put(data, "generic/needs.txt", "first line\n{{ also_missing }}\n")
    put(data, "cloud/empty.yaml", "{% if false %}#cloud-config{% endif %}")
    put(data, "cloud/syntax.yaml", "#cloud-config\nhostname: {{ oops\n")
    put(data, "cloud/label.yaml", "#cloud-config\nhostname: h-{{ request.query.serial }}\n")
    put(data, "profiles/strict.json", {"release": "tiny", "cloud_id": "needs.yaml", "generic_id": "needs.txt",
                                       "boot": {"args": ["x={{ nope_arg }}"]}})
    put(data, "profiles/empty.json", {"release": "tiny", "cloud_id": "empty.yaml"})
    put(data, "profiles/syntax.json", {"release": "tiny", "cloud_id": "syntax.yaml"})
    put(data, "profiles/label.json", {"release": "tiny", "cloud_id": "label.yaml"})
    # Without `| yaml` a value can break the YAML: the server then refuses the whole config.
    put(data, "cloud/raw.yaml", "#cloud-config\nhostname: {{ role }}\n")
    put(data, "profiles/raw.json", {"release": "tiny", "cloud_id": "raw.yaml"})
    for ident, profile, extra in (("strict", "strict", {}), ("empty", "empty", {}), ("syntax", "syntax", {}),
                                  ("label", "label", {}),
                                  ("badvalue", "tiny", {"reboot_strategy": "whenever"}),
                                  ("badyaml", "raw", {"role": "x: [unclosed"})):
        put(data, f"groups/{ident}.json", {"profile": profile, "selector": {"os": ident},
                                           "metadata": {**base, **extra}})
    s = serve(data, "--assets", str(assets))

    cases = [
        ("/cloud?os=strict", 500, ["cloud/needs.yaml for group 'strict'", "'missing_thing' is undefined"]),
        ("/generic?os=strict", 500, ["generic/needs.txt for group 'strict'", "'also_missing' is undefined"]),
        ("/ipxe?os=strict", 500, ["boot.args[0]", "'nope_arg' is undefined"]),
        ("/grub?os=strict", 500, ["boot.args[0]", "'nope_arg' is undefined"]),
        ("/cloud?os=empty", 500, ["rendered an invalid cloud-config", "not a #cloud-config or a script"]),
        ("/cloud?os=syntax", 500, ["template cloud/syntax.yaml: line 2"]),
        ("/cloud?os=badvalue&mac=52:54:00:00:00:07", 500,
         ["rendered an invalid cloud-config", "invalid value 'whenever'"]),
        ("/cloud?os=badyaml", 500, ["rendered an invalid cloud-config", "YAML syntax error"]),
        # A label the template needs and the request lacks is the request's fault: 400, not 500.
        ("/cloud?os=label", 400, ["needs the request label 'serial', which this request did not give"]),
        ("/cloud", 400, ["cloud/node.yaml for group 'default' needs the request label 'mac'"]),
        ("/cloud?mac=zz", 400, ["needs the request label 'mac'", "(ignored malformed mac=zz)"]),
        ("/generic?mac=52:54:00:12:34", 400, ["needs the request label 'mac'"]),
    ]
    for target, status, needles in cases:
        r = raw(s, target)
        assert r.status == status, (target, r.status, r.text)
        line = one_line_error(r)
        for n in needles:
            assert n in line, (target, line)
        # Never a half-rendered config: nothing of the template's text leaks out.
        assert not r.text.startswith("#") and "first line" not in line and "hostname:" not in line
        assert line[len("error: "):-1] in s.log_text(), "the reason is in the server log"
    assert raw(s, "/cloud?os=label&serial=ABC").text == "#cloud-config\nhostname: h-ABC\n"
    clean_log(s)


# --- assets ----------------------------------------------------------------------------------------

def test_assets_range_and_head(data: Path, assets: Path, serve) -> None:  # noqa: ANN001
    s = serve(data, "--assets", str(assets))
    path = "/assets/tiny/0.10.0/vmlinuz"
    blob = (assets / "tiny" / "0.10.0" / "vmlinuz").read_bytes()
    n = len(blob)

    full = raw(s, path)
    assert full.status == 200 and full.body == blob and full.headers["accept-ranges"] == "bytes"
    for rng, lo, hi in (("bytes=100-199", 100, 199), ("bytes=0-0", 0, 0), (f"bytes={n - 10}-", n - 10, n - 1),
                        ("bytes=-10", n - 10, n - 1), (f"bytes=65530-{n + 5000}", 65530, n - 1),
                        ("bytes=131072-262143", 131072, 262143)):
        r = raw(s, path, headers={"Range": rng})
        assert r.status == 206, (rng, r.status)
        assert r.body == blob[lo:hi + 1], rng
        assert r.headers["content-range"] == f"bytes {lo}-{hi}/{n}"
    multi = raw(s, path, headers={"Range": "bytes=0-9,100-109"})
    assert multi.status == 206 and multi.headers["content-type"].startswith("multipart/byteranges")
    assert blob[0:10] in multi.body and blob[100:110] in multi.body

    head = raw(s, path, method="HEAD")
    assert head.status == 200 and head.body == b"" and head.headers["content-length"] == str(n)
    head = raw(s, path, method="HEAD", headers={"Range": "bytes=10-19"})
    assert head.status == 206 and head.body == b"" and head.headers["content-range"] == f"bytes 10-19/{n}"

    assert raw(s, path, headers={"Range": f"bytes={n}-{n + 10}"}).status == 416
    for bad in ("bytes=10-5", "bytes=abc", "items=0-1", "bytes=", "bytes=--1", "bytes=1-2-3", "bytes=0-1,,"):
        r = raw(s, path, headers={"Range": bad})
        assert r.status in (200, 206, 400, 416), (bad, r.status)
        if r.status == 200:
            assert r.body == blob
    clean_log(s)


TRAVERSALS = [
    "/assets/../secret.txt", "/assets/../../secret.txt", "/assets/%2e%2e/secret.txt", "/assets/%2E%2E/secret.txt",
    "/assets/.%2e/secret.txt", "/assets/%2e./secret.txt", "/assets/tiny/%2e%2e/%2e%2e/secret.txt",
    "/assets/tiny/0.9.0/../../../secret.txt", "/assets/..%2fsecret.txt", "/assets/%2e%2e%2fsecret.txt",
    "/assets/tiny%2f..%2f..%2fsecret.txt", "/assets/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/assets/" + "../" * 12 + "etc/passwd", "/assets/" + "%2e%2e/" * 12 + "etc/passwd",
    "/assets//etc/passwd", "/assets///etc/passwd", "/assets/%2fetc/passwd", "/assets/%2Fetc%2Fpasswd",
    "/assets/tiny//0.9.0/vmlinuz", "/assets/tiny/0.9.0/", "/assets/",
    "/assets/..\\secret.txt", "/assets/tiny\\..\\..\\secret.txt", "/assets/%5c..%5csecret.txt",
    "/assets/..%5c..%5csecret.txt", "/assets/C:%5csecret.txt",
    "/assets/.hidden", "/assets/tiny/.hidden", "/assets/%2ehidden", "/assets/.git/config",
    "/assets/evil", "/assets/evildir/secret.txt", "/assets/evildir/", "/assets/tiny/escape",
    "/assets/%00", "/assets/tiny/0.9.0/vmlinuz%00.txt", "/assets/secret.txt%00",
    "/assets/./tiny/0.9.0/vmlinuz", "/assets/tiny/./0.9.0/vmlinuz", "/assets/%252e%252e/secret.txt",
    "/assets/..;/secret.txt", "/assets/....//secret.txt", "/assets/%c0%ae%c0%ae/secret.txt",
    "/assets/%e2%80%a5/secret.txt", "/assets/~/secret.txt", "/assets/%7e/secret.txt",
    "/assets/tiny/0.9.0/vmlinuz/../../../../secret.txt", "/assets/..", "/assets/.", "/assets/%2e",
    "/assets/%0a/secret.txt", "/assets/x%0d%0aSet-Cookie:%20a=b",
]


def test_asset_traversal_refused(data: Path, assets: Path, serve, tmp_path: Path) -> None:  # noqa: ANN001
    (tmp_path / "secret.txt").write_text(SECRET)
    (data / "secret.txt").write_text(SECRET)
    (assets / ".hidden").write_text(SECRET)
    (assets / "tiny" / ".hidden").write_text(SECRET)
    (assets / ".git").mkdir()
    (assets / ".git" / "config").write_text(SECRET)
    (assets / "evil").symlink_to(tmp_path / "secret.txt")  # a symlink out of the assets folder
    (assets / "evildir").symlink_to(tmp_path, target_is_directory=True)
    (assets / "tiny" / "escape").symlink_to("../../secret.txt")
    (assets / "tiny" / "current").symlink_to("0.10.0", target_is_directory=True)  # inside: allowed
    s = serve(data, "--assets", str(assets))

    refused = 0
    targets: list[str | bytes] = [*TRAVERSALS, f"http://127.0.0.1:{s.port}/assets/../secret.txt",
                                  b"/assets/\xe2\x80\xa5/secret.txt", b"/assets/..\xc0\xaf/secret.txt"]
    for target in targets:
        for method in ("GET", "HEAD"):
            r = raw(s, target, method=method)
            assert r.status in (400, 404), (target, method, r.status, r.text)
            assert SECRET not in r.text and "root:" not in r.text, target
            assert "set-cookie" not in r.headers
            refused += 1
    assert refused == 2 * len(targets)
    r = raw(s, "/assets/tiny/current/initrd")  # a link that stays inside the assets folder is fine
    assert r.status == 200 and r.body == (assets / "tiny" / "0.10.0" / "initrd").read_bytes()
    clean_log(s)


# --- who may read, and what the scripts point at ---------------------------------------------------

def test_allow_networks(data: Path, assets: Path, serve) -> None:  # noqa: ANN001
    s = serve(data, "--assets", str(assets), "--allow", "10.0.0.0/8")
    for path in (f"/ipxe?mac={NODE1}", "/boot.ipxe", "/boot.ipxe.0", f"/cloud?mac={NODE1}", "/metadata",
                 "/generic", f"/grub?mac={NODE1}", "/assets/tiny/0.10.0/vmlinuz", "/"):
        r = raw(s, path)
        assert r.status == 403, (path, r.status)
        assert "client 127.0.0.1 is not in an allowed network" in one_line_error(r)
    assert raw(s, "/health").status == 200  # liveness stays open for load balancers

    s2 = serve(data, "--assets", str(assets), "--allow", "127.0.0.0/8")
    assert raw(s2, f"/ipxe?mac={NODE1}").status == 200
    assert raw(s2, "/assets/tiny/0.10.0/vmlinuz", headers={"Range": "bytes=0-3"}).status == 206

    s3 = serve(data, "--assets", str(assets), "--allow", "10.0.0.0/8", "--allow", "127.0.0.1/32", "--allow", "::1/128")
    assert raw(s3, "/boot.ipxe").status == 200
    for x in (s, s2, s3):
        clean_log(x)


HOSTILE_HOSTS: list[str | bytes] = [
    "evil.example.com/`reboot`", "a b", "evil;reboot", "${x}", "x'y", 'x"y', "evil.com:99999", "evil.com:0",
    "evil.com:65536", "[::1", "evil\tcom", "", "evil.com:80:80", "evil.com#frag", "evil.com?x=1", "user@evil.com",
    "evil.com\\x", "(http,evil)", "evil.com:-1", "évil.com", b"\xffevil", "%65vil.com", "evil.com:8080 initrd=x",
]


def test_hostile_host_header_not_echoed(data: Path, assets: Path, serve, tmp_path: Path) -> None:  # noqa: ANN001
    need_tools("grub-script-check")
    s = serve(data, "--assets", str(assets))
    own = f"127.0.0.1:{s.port}"
    for host in HOSTILE_HOSTS:
        shown = host.decode("latin-1") if isinstance(host, bytes) else host
        for path in (f"/ipxe?mac={NODE1}", f"/grub?mac={NODE1}", f"/cloud?mac={NODE1}", f"/generic?mac={NODE1}"):
            r = raw(s, path, host=host)
            assert r.status == 200, (host, path, r.status, r.text)
            if shown:
                assert shown not in r.text, (host, path, r.text)
            assert own in r.text, (host, path)
            if path.startswith("/grub"):
                _grub_check(r.text, tmp_path)
    # A well-formed Host is how the host reached this server, so the scripts point there (matchbox does too).
    r = raw(s, f"/ipxe?mac={NODE1}", host="boot.example.com:8080")
    assert "kernel http://boot.example.com:8080/assets/tiny/0.10.0/vmlinuz " in r.text
    r = raw(s, f"/grub?mac={NODE1}", host="[fd00::5]:8080")
    assert "linux '(http,[fd00::5]:8080)/assets/tiny/0.10.0/vmlinuz'" in r.text
    # No Host header at all (HTTP/1.0): the listening address.
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
        sock.sendall(f"GET /ipxe?mac={NODE1} HTTP/1.0\r\n\r\n".encode())
        data_ = b""
        while chunk := sock.recv(65536):
            data_ += chunk
    assert data_.startswith(b"HTTP/1.1 200") and f"kernel http://{own}/assets/".encode() in data_

    # --public-url wins over any Host header.
    p = serve(data, "--assets", str(assets), "--public-url", "http://prov.example:8080/")
    for host in ("evil.example.com", "a b", ""):
        r = raw(p, f"/ipxe?mac={NODE1}", host=host)
        assert "kernel http://prov.example:8080/assets/tiny/0.10.0/vmlinuz " in r.text
        assert "cloud-config-url=http://prov.example:8080/cloud?" in r.text
    r = raw(p, f"/grub?mac={NODE1}", host="evil.example.com")
    assert "(http,prov.example:8080)/assets/tiny/0.10.0/vmlinuz" in r.text
    clean_log(s)
    clean_log(p)


# --- malformed queries -----------------------------------------------------------------------------

MALFORMED_QUERIES = [
    "mac=", "mac=zz", "mac=52:54:00:12:34", "mac=52:54:00:12:34:56:78", "mac=52:54-00:12:34:56", "mac=%00",
    "mac=52%3A54%3A00%3A12%3A34%3A56%00", "mac=" + "a" * 8000, "mac=%ff%fe", "mac=${mac:hexhyp}",
    "uuid=junk", "uuid=" + "0" * 5000, "uuid=%7B%7D", "serial=%0a%0d", "hostname=" + "h" * 300,
    "MAC=52:54:00:12:34:56", "=x", "=", "&&&", "&=&=&", "a", "a&b&c", "%ff=1", "%00=%00", "k%0aey=v",
    "a b=c", "a+b=c", "key=" + "%41" * 2000, "mac=52:54:00:12:34:56&mac=zz", "mac=zz&mac=52:54:00:12:34:56",
    "&".join(f"k{i}=v" for i in range(800)), "&".join("mac=zz" for _ in range(800)),
    "&".join(f"K{i}=v" for i in range(800)), "os=installed;mac=52:54:00:12:34:56", "x=%", "x=%zz", "x=%%%",
    "request=1&server_url=evil&request.query=2", "__class__=x", "mac[]=1", "mac[0]=52:54:00:12:34:56",
    "{{7*7}}={{7*7}}", "x={{7*7}}&role={%25 raw %25}", "x=%C0%AE", "x=\u202e", "x=%E2%80%AE",
]


def test_malformed_queries_never_500(data: Path, assets: Path, serve) -> None:  # noqa: ANN001
    from urllib.parse import quote

    s = serve(data, "--assets", str(assets))
    endpoints = ("/ipxe", "/grub", "/cloud", "/generic", "/metadata")
    tried = 0
    for phase in ("with default", "without default"):
        for q in MALFORMED_QUERIES:
            target = "?" + quote(q, safe="=&%;+[]{}*$:")
            for ep in endpoints:
                r = raw(s, ep + target)
                tried += 1
                assert r.status in (200, 400, 404), (phase, ep, q[:80], r.status, r.text[:300])
                if r.status != 200:
                    line = one_line_error(r)
                    assert len(line) < 4000, (ep, q[:80])
                    assert "49" not in line or "7*7" not in q  # templates in a query are never rendered
                elif ep == "/ipxe":
                    assert r.text.startswith("#!ipxe\n")
                if phase == "without default" and r.status == 400:
                    # Nothing matches now, but a label with a control character is refused before that.
                    assert "control character or line break" in one_line_error(r), (ep, q[:80])
                elif phase == "without default":
                    assert r.status in (200, 404), (ep, q[:80], r.status)
        (data / "groups" / "default.json").unlink(missing_ok=True)
    # Huge request lines: refused by the HTTP parser, or answered like any other unknown host.
    for size in (70_000, 1_000_000):
        try:
            r = raw(s, "/ipxe?mac=" + "a" * size + "&os=" + "b" * size)
        except (ConnectionError, ValueError, IndexError):
            continue  # the server closed the connection: refused, not crashed
        assert r.status in (400, 404, 414, 431), r.status
        if r.status == 404:
            assert len(one_line_error(r)) < 1000
    assert raw(s, f"/ipxe?mac={NODE1}").status == 200
    clean_log(s)
    assert tried == 2 * len(MALFORMED_QUERIES) * len(endpoints)
