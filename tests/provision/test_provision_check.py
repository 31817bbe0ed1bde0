"""`obelisk provision check` on the example and on broken data folders, and `obelisk provision serve`
refusing bad arguments: exit 2, one line naming the file (or the option) and the problem, no traceback.

The broken-folder matrix runs the command in-process (typer's runner: the same command function,
exit code and output, without a second of interpreter start-up per case); a sample of it, the
example and every `serve` case run as real `obelisk` processes, a few at a time.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from prov_helpers import copy_example
from testlib import OBELISK
from typer.testing import CliRunner

from obelisk.cli import build_app

Edit = Callable[[Path], None]


def _json_edit(rel: str, change: Callable[[dict], object]) -> Edit:
    """`change` edits the parsed file in place (what it returns is ignored)."""
    def edit(d: Path) -> None:
        p = d / rel
        data = json.loads(p.read_text())
        change(data)
        p.write_text(json.dumps(data, indent=2))
    return edit


def _write(rel: str, text: str | bytes) -> Edit:
    def edit(d: Path) -> None:
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return edit


def _append(rel: str, text: str) -> Edit:
    def edit(d: Path) -> None:
        with open(d / rel, "a") as f:
            f.write(text)
    return edit


def _copy(src: str, dst: str, **changes: object) -> Edit:
    def edit(d: Path) -> None:
        data = json.loads((d / src).read_text())
        data.update(changes)
        (d / dst).write_text(json.dumps(data))
    return edit


def _both(*edits: Edit) -> Edit:
    def edit(d: Path) -> None:
        for e in edits:
            e(d)
    return edit


G = "groups/node1.json"
P = "profiles/tiny.json"

# (case, edit, file named in the finding, what the message must say)
BROKEN: list[tuple[str, Edit, str, str]] = [
    ("group invalid json", _write(G, "{\"profile\": \"tiny\",\n"), G, "is not valid JSON"),
    ("profile invalid json", _write(P, "{bad"), P, "is not valid JSON (Expecting property name"),
    ("empty group file", _write(G, ""), G, "is not valid JSON"),
    ("group not an object", _write(G, "[]"), G, "a group must be a JSON object"),
    ("profile not an object", _write(P, "\"tiny\""), P, "a profile must be a JSON object"),
    ("group unknown field", _json_edit(G, lambda g: g.update(colour="red")), G,
     "colour: Extra inputs are not permitted"),
    ("bootcfg-era spec field", _json_edit(G, lambda g: g.update(spec="tiny")), G, "spec: Extra inputs"),
    ("profile unknown field", _json_edit(P, lambda p: p.update(kernel="/k")), P, "kernel: Extra inputs"),
    ("old cmdline map", _json_edit(P, lambda p: p["boot"].update(cmdline={"coreos.autologin": ""})), P,
     "boot.cmdline: Extra inputs"),
    ("group id differs from its name", _json_edit(G, lambda g: g.update(id="node2")), G,
     "group id 'node2' does not match its name 'node1'"),
    ("profile id differs from its name", _json_edit(P, lambda p: p.update(id="other")), P,
     "profile id 'other' does not match its name 'tiny'"),
    ("group file name not an id", _copy(G, "groups/node one.json", id="node one", selector={"os": "x"}),
     "groups/node one.json", "the server ignores this file: not a valid name"),
    ("group file name starts with a dash", _copy(G, "groups/-node.json", selector={"os": "x"}), "groups/-node.json",
     "the server ignores this file"),
    ("profile id not an id", _json_edit(G, lambda g: g.update(profile="../tiny")), G, "profile: String should match"),
    ("group names a missing profile", _json_edit(G, lambda g: g.update(profile="ghost")), G,
     "profile 'ghost' does not exist (no profiles/ghost.json)"),
    ("group without profile", _json_edit(G, lambda g: g.pop("profile")), G, "profile: Field required"),
    ("two default groups", _copy("groups/default.json", "groups/default2.json", id="default2"),
     "groups/default2.json", "default groups: default and default2; only default is ever chosen"),
    ("two groups with one selector", _copy(G, "groups/node1b.json", id="node1b"), "groups/node1b.json",
     "groups with the same selector (mac=52:54:00:12:34:56): node1 and node1b"),
    ("selector mac not a mac", _json_edit(G, lambda g: g["selector"].update(mac="zz:zz")), G,
     "selector mac='zz:zz' is not a valid mac"),
    ("selector uuid not a uuid", _json_edit(G, lambda g: g["selector"].update(uuid="nope")), G,
     "selector uuid='nope' is not a valid uuid"),
    ("selector key upper case", _json_edit(G, lambda g: g.update(selector={"MAC": "52:54:00:12:34:56"})), G,
     "selector.MAC"),
    ("selector value not a string", _json_edit(G, lambda g: g["selector"].update(rack=2)), G,
     "selector.rack: Input should be a valid string"),
    ("metadata not an object", _json_edit(G, lambda g: g.update(metadata=["a"])), G, "metadata: Input should be"),
    ("cloud template syntax error", _append("cloud/node.yaml", "{% if %}\n"), "cloud/node.yaml",
     "template cloud/node.yaml: line 17: Expected an expression"),
    ("generic template unclosed", _write("generic/hosts.txt", "{{ role \n"), "generic/hosts.txt",
     "template generic/hosts.txt: line"),
    ("template needs a variable the group lacks", _append("generic/hosts.txt", "{{ rack_number }}\n"),
     "groups/default.json", "generic/hosts.txt for group 'default': 'rack_number' is undefined"),
    ("group metadata lacks what the cloud template uses", _json_edit("groups/default.json",
                                                                     lambda g: g["metadata"].pop("update_group")),
     "groups/default.json", "cloud/node.yaml for group 'default': 'update_group' is undefined"),
    ("template renders an invalid cloud-config", _json_edit(G, lambda g: g["metadata"].update(
        reboot_strategy="whenever")), G, "rendered an invalid cloud-config (line 8: error: invalid value 'whenever'"),
    # A value put in without `| yaml` can break the YAML (the example's templates quote every value).
    ("template renders broken YAML", _both(_append("cloud/node.yaml", "extra_role: {{ role }}\n"),
                                           _json_edit(G, lambda g: g["metadata"].update(role="a: [b"))), G,
     "rendered an invalid cloud-config (line 17: error: YAML syntax error"),
    ("template not UTF-8", _write("cloud/node.yaml", b"#cloud-config\nhostname: \xff\xfe\n"), "cloud/node.yaml",
     "is not UTF-8 text"),
    ("boot arg template lacks a variable", _json_edit(P, lambda p: p["boot"]["args"].append("x={{ nope }}")),
     "groups/default.json", "profile tiny boot.args[4] for group 'default': 'nope' is undefined"),
    ("profile with both release and boot.kernel", _json_edit(P, lambda p: p["boot"].update(kernel="/assets/k")), P,
     "give either release or boot.kernel/boot.initrd, not both"),
    ("profile with both release and boot.initrd", _json_edit(P, lambda p: p["boot"].update(initrd=["/assets/i"])),
     P, "not both"),
    ("profile names a missing cloud template", _json_edit(P, lambda p: p.update(cloud_id="gone.yaml")), P,
     "cloud_id 'gone.yaml': no cloud/gone.yaml"),
    ("profile template name leaves its folder", _json_edit(P, lambda p: p.update(generic_id="../groups/node1.json")),
     P, "generic_id: String should match pattern"),
    ("boot arg with a newline", _json_edit(P, lambda p: p["boot"]["args"].append("a\nb")), P, "boot.args.4"),
    ("kernel path with a space", _json_edit(P, lambda p: p.update(release=None, boot={"kernel": "/a b"})), P,
     "boot.kernel: String should match pattern"),
    ("release name with ..", _json_edit(P, lambda p: p.update(release="tiny/../x")), P, "release: String should match"),
    ("huge group file", _write("groups/big.json", "{\"profile\": \"tiny\", \"name\": \"" + "x" * (1 << 20) + "\"}"),
     "groups/big.json", "more than the 1048576 allowed"),
    ("everything at once", _both(_write(G, "{"), _write(P, "[]")), G, "is not valid JSON"),
]


@dataclass
class Run:
    code: int
    out: str
    err: str


def _run_all(jobs: dict[str, list[str]], parallel: int = 4) -> dict[str, Run]:
    """Run each command (a real `obelisk` process) a few at a time; a hung one is killed."""
    pending = list(jobs.items())
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    done: dict[str, Run] = {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                name, argv = pending.pop(0)
                running[name] = (subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                                 time.monotonic())
            for name, (p, started) in list(running.items()):
                if p.poll() is None and time.monotonic() - started < 60:
                    continue
                if p.poll() is None:
                    p.kill()  # a `serve` that should have refused its arguments and started instead
                out, err = p.communicate()
                done[name] = Run(p.returncode, out, err)
                del running[name]
            time.sleep(0.02)
    finally:
        for p, _ in running.values():
            p.kill()
            p.wait()
    return done


def _in_process(*args: str) -> Run:
    """`obelisk provision check ...` through the real root command, in this process."""
    res = CliRunner().invoke(build_app(["provision"]), ["provision", "check", *args])
    # Only a clean exit is allowed through: any other exception is a traceback for the user.
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return Run(res.exit_code, res.stdout, res.stderr)


def _no_traceback(r: Run) -> None:
    assert "Traceback" not in r.out + r.err, r.out + r.err


def _assert_reports(text: Run, as_json: Run, where: str, needle: str) -> None:
    assert text.code == 2, f"exit {text.code}\n{text.out}{text.err}"
    _no_traceback(text)
    errors = [line for line in text.out.splitlines() if line.startswith("error: ")]
    hits = [line for line in errors if line.startswith(f"error: {where}: ") and needle in line]
    assert hits, f"no 'error: {where}: ...{needle}...' line in:\n{text.out}"
    assert f": {len(errors)} errors, " in text.out.splitlines()[-1]  # the summary counts them

    assert as_json.code == 2
    _no_traceback(as_json)
    j = json.loads(as_json.out)
    assert j["ok"] is False
    assert any(f["level"] == "error" and f["where"] == where and needle in f["message"] for f in j["findings"]), j


@pytest.mark.parametrize(("case", "edit", "where", "needle"), BROKEN, ids=[c for c, *_ in BROKEN])
def test_broken_data_folder_exits_2_naming_file_and_problem(tmp_path: Path, case: str, edit: Edit, where: str,
                                                            needle: str) -> None:
    d = copy_example(tmp_path / "d")
    edit(d)
    _assert_reports(_in_process("--data", str(d)), _in_process("--data", str(d), "--json"), where, needle)


# Broken cases also run as real processes: what an operator's shell sees.
REAL = ["group invalid json", "group names a missing profile", "two default groups",
        "template needs a variable the group lacks", "profile with both release and boot.kernel",
        "cloud template syntax error", "group file name not an id"]


@pytest.fixture(scope="module")
def check_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    base = tmp_path_factory.mktemp("check")
    jobs: dict[str, list[str]] = {}
    for name, edit, _, _ in BROKEN:
        if name in REAL:
            d = copy_example(base / f"case{len(jobs)}")
            edit(d)
            jobs[name] = [OBELISK, "provision", "check", "--data", str(d)]
            jobs[name + " --json"] = [OBELISK, "provision", "check", "--data", str(d), "--json"]
    ok = copy_example(base / "example")
    jobs["example"] = [OBELISK, "provision", "check", "--data", str(ok)]
    jobs["example --json"] = [OBELISK, "provision", "check", "--data", str(ok), "--json"]
    jobs["missing folder"] = [OBELISK, "provision", "check", "--data", str(base / "nope")]
    return _run_all(jobs)


def test_example_checks_clean(check_runs: dict[str, Run]) -> None:
    r = check_runs["example"]
    assert r.code == 0, r.out + r.err
    _no_traceback(r)
    assert "1 profiles, 2 groups, 2 templates: 0 errors" in r.out
    j = json.loads(check_runs["example --json"].out)
    assert check_runs["example --json"].code == 0
    assert j["ok"] is True and j["counts"] == {"profiles": 1, "groups": 2, "templates": 2}
    assert all(f["level"] == "warning" for f in j["findings"])


def test_missing_data_folder(check_runs: dict[str, Run]) -> None:
    r = check_runs["missing folder"]
    assert r.code == 2 and "no such folder" in r.out
    _no_traceback(r)


@pytest.mark.parametrize("case", REAL)
def test_broken_data_folder_as_a_real_process(check_runs: dict[str, Run], case: str) -> None:
    _, _, where, needle = next(b for b in BROKEN if b[0] == case)
    _assert_reports(check_runs[case], check_runs[case + " --json"], where, needle)


def test_warnings_alone_do_not_fail(tmp_path: Path) -> None:
    d = copy_example(tmp_path / "d")
    (d / "groups" / "default.json").unlink()  # no default group: hosts that match none get a 404
    (d / "groups" / "README").write_text("not a group")
    (d / "cloud" / "label.yaml").write_text("#cloud-config\nhostname: h-{{ request.query.rack }}\n")
    prof = json.loads((d / "profiles" / "tiny.json").read_text())
    prof["cloud_id"] = "label.yaml"
    (d / "profiles" / "tiny.json").write_text(json.dumps(prof))
    r = _in_process("--data", str(d))
    assert r.code == 0, r.out
    assert "warning: groups: no default group" in r.out
    assert "warning: groups/README: ignored" in r.out
    # A template needing a label only the host sends is not broken data: hosts that send it are served.
    assert "warning: groups/node1.json: cloud/label.yaml for group 'node1' needs the request label 'rack'" in r.out


# --- serve: bad arguments --------------------------------------------------------------------------

# (case, arguments after `obelisk provision serve`, what the one error line must say); {data} is a
# copy of the example, {base} a folder with the files named here, {listen} a free loopback port.
SERVE_CASES: list[tuple[str, list[str], str]] = [
    ("missing data folder", ["--data", "{base}/nope", "--listen", "{listen}"], "data folder"),
    ("data is a file", ["--data", "{base}/afile", "--listen", "{listen}"], "does not exist"),
    ("listen without port", ["--data", "{data}", "--listen", "nope"], "is not HOST:PORT"),
    ("listen port zero", ["--data", "{data}", "--listen", "127.0.0.1:0"], "is not HOST:PORT"),
    ("listen port too big", ["--data", "{data}", "--listen", "127.0.0.1:99999"], "is not HOST:PORT"),
    ("listen port not a number", ["--data", "{data}", "--listen", "127.0.0.1:http"], "is not HOST:PORT"),
    ("listen without host", ["--data", "{data}", "--listen", ":8080"], "is not HOST:PORT"),
    ("listen ipv6 without port", ["--data", "{data}", "--listen", "[::1]"], "is not HOST:PORT"),
    ("listen negative port", ["--data", "{data}", "--listen", "127.0.0.1:-1"], "is not HOST:PORT"),
    ("allow not a network", ["--data", "{data}", "--listen", "{listen}", "--allow", "banana"],
     "--allow 'banana' is not a network"),
    ("allow prefix too long", ["--data", "{data}", "--listen", "{listen}", "--allow", "10.0.0.0/33"],
     "is not a network"),
    ("allow empty", ["--data", "{data}", "--listen", "{listen}", "--allow", ""], "is not a network"),
    ("public url not a url", ["--data", "{data}", "--listen", "{listen}", "--public-url", "notaurl"],
     "--public-url 'notaurl' is not a base URL"),
    ("public url bad port", ["--data", "{data}", "--listen", "{listen}", "--public-url", "http://h:99999"],
     "is not a base URL"),
    ("public url ftp", ["--data", "{data}", "--listen", "{listen}", "--public-url", "ftp://h/"], "is not a base URL"),
    ("allow one good one bad", ["--data", "{data}", "--listen", "{listen}", "--allow", "10.0.0.0/8",
                                "--allow", "10.0.0.0/8/9"], "'10.0.0.0/8/9' is not a network"),
    ("token file too short", ["--data", "{data}", "--listen", "{listen}", "--write-token-file", "{base}/short.token"],
     "at least 16 characters"),
    ("token file two words", ["--data", "{data}", "--listen", "{listen}", "--write-token-file", "{base}/spaced.token"],
     "one word"),
    ("token file missing", ["--data", "{data}", "--listen", "{listen}", "--write-token-file", "{base}/none.token"],
     "cannot read the write token file"),
    ("token file a folder", ["--data", "{data}", "--listen", "{listen}", "--write-token-file", "{base}/tokdir"],
     "cannot read the write token file"),
    ("assets missing", ["--data", "{data}", "--listen", "{listen}", "--assets", "{base}/nope"], "assets folder"),
    ("tls cert without key", ["--data", "{data}", "--listen", "{listen}", "--tls-cert", "{base}/afile"],
     "go together"),
    ("client ca without write listen", ["--data", "{data}", "--listen", "{listen}", "--client-ca", "{base}/afile"],
     "--write-listen"),
    ("write listen without tls", ["--data", "{data}", "--listen", "{listen}", "--write-listen", "127.0.0.1:9"],
     "--tls-cert"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    base = tmp_path_factory.mktemp("serve-args")
    data = copy_example(base / "data")
    (base / "short.token").write_text("short\n")
    (base / "spaced.token").write_text("aaaaaaaaaaaaaaaaaaaa bbbbbbbbbbbbbbbbbbbb\n")
    (base / "tokdir").mkdir()
    (base / "afile").write_text("")
    # A port nothing listens on: should a case wrongly start a server, it is killed after 30 s.
    subst = {"{data}": str(data), "{base}": str(base), "{listen}": f"127.0.0.1:{_free_port()}"}

    def fill(arg: str) -> str:
        for k, v in subst.items():
            arg = arg.replace(k, v)
        return arg
    return _run_all({name: [OBELISK, "provision", "serve", *map(fill, argv)] for name, argv, _ in SERVE_CASES})


@pytest.mark.parametrize(("case", "needle"), [(c, n) for c, _, n in SERVE_CASES], ids=[c for c, *_ in SERVE_CASES])
def test_serve_refuses_bad_arguments_with_one_error_line(serve_runs: dict[str, Run], case: str, needle: str) -> None:
    r = serve_runs[case]
    assert r.code == 2, f"exit {r.code}\n{r.err}"
    _no_traceback(r)
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    assert needle in lines[0], lines[0]


def test_serve_cannot_listen_is_one_error_line(tmp_path: Path) -> None:
    """A port already taken or a host that does not resolve: exit 2 and one `error:` line, no traceback."""
    data = copy_example(tmp_path / "data")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for listen in (f"127.0.0.1:{port}", "999.1.1.1:8080"):
            res = subprocess.run([OBELISK, "provision", "serve", "--data", str(data), "--listen", listen],
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 2, res.stderr
            assert "Traceback" not in res.stderr
            errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1 and listen in errors[0], res.stderr


def test_serve_bad_log_level_is_one_error_line(tmp_path: Path) -> None:
    data = copy_example(tmp_path / "data")
    res = subprocess.run([OBELISK, "provision", "serve", "--data", str(data), "--listen", f"127.0.0.1:{_free_port()}",
                          "--log-level", "nonsense"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == ["error: --log-level 'nonsense' is not one of critical, error, warning, "
                                                "info, debug, trace"], res.stderr
