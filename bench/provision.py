"""Provisioning server throughput: `/ipxe` and `/cloud` against a 1 KiB static asset on the same server.

    python -m bench provision [--duration 5] [--concurrency 1,8,32,64] [--groups 200] [--loadgen auto|wrk|python]

Starts the real `obelisk provision serve` (uvicorn, one process) on a free loopback port with a
temporary copy of examples/provision grown to --groups groups (one MAC each) plus the default group,
and an assets folder holding the PXE release(s) under out/tiny (hard links, not copies) and a
1 KiB file. At each concurrency level it measures, back to back, for the same duration:

- static : GET /assets/static/1k.bin (Starlette FileResponse of 1 KiB): the baseline;
- ipxe   : GET /ipxe?mac=...  (group selection over all groups, release lookup, kernel args rendered);
- cloud  : GET /cloud?mac=... (selection, jinja2 render, cloud-config validation verdict; after the
  warm-up every rendered config has been seen, so the verdict comes from the server's cache);
- cloud-new: GET /cloud?mac=<a MAC never asked before>: the default group renders a config naming
  the MAC, new text every time, so each request also runs the full cloud-config validation (a host's
  first boot; the cached verdict above is a re-boot or a retry);
- floor  : GET /health (a 3-byte in-memory answer): what Starlette + uvicorn cost on their own, for
  scale (no ratio is taken against it).

The MACs rotate through a list where half are matched by a group (spread over all of them) and half
match none, so they fall through every MAC group to the default group (selection's worst case).
Ratios are ours / static from the same run at the same concurrency: rps ratio < 1 is slower than
serving a file, p99 ratio > 1 is a longer tail. "srv CPU/req" is the server's user+system CPU time
per answered request (from /proc/PID/stat), the figure least bent by the load generator sharing the
machine's cores. Peak RSS is the server's VmHWM. The load generator is `wrk` (Debian package; one
thread by default, a Lua script rotates the URLs and reports exact percentiles), else an asyncio
keep-alive client in this process, which costs about as much CPU as the server and so understates
throughput: the output says which one ran. Both use keep-alive connections and are closed-loop
(wrk's percentiles are not corrected for coordinated omission).

Extra options to try server variants without editing it: --server-arg (repeatable; passed to
`obelisk provision serve`, e.g. --server-arg=--log-level=warning), --pythonpath DIR (prepended to the
server's PYTHONPATH, e.g. a `pip install --target DIR uvloop httptools`, which uvicorn then picks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples/provision"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ENDPOINTS = ("static", "ipxe", "cloud", "cloud-new", "floor")

LUA_DONE = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests": %d, "duration_us": %d, "bytes": %d, "p50": %d, "p99": %d, "max": %d, '
    .. '"connect": %d, "read": %d, "write": %d, "timeout": %d, "status": %d}\\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.timeout, e.status))
end
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
"""

LUA_ROTATE = """
local paths = {%s}
local n = #paths
local i = 0
function init(args)
  i = (tid or 0) * 97  -- each wrk thread starts at a different place in the list
end
function request()
  i = i + 1
  return wrk.format("GET", paths[(i %% n) + 1])
end
"""

LUA_FRESH = """
local prefix = %s
local salt = %d
local i = 0
function request()
  i = i + 1
  local f = math.floor
  return wrk.format("GET", string.format("%%s02-%%02x-%%02x-%%02x-%%02x-%%02x", prefix,
                    (salt * 8 + (tid or 0)) %% 256, f(i / 16777216) %% 256, f(i / 65536) %% 256,
                    f(i / 256) %% 256, i %% 256))
end
"""


@dataclass
class Rotate:
    """A fixed list of URLs, requested in turn."""

    paths: list[str]

    def lua(self, salt: int) -> str:
        return LUA_ROTATE % ", ".join(json.dumps(p) for p in self.paths) + LUA_DONE

    def path(self, i: int, salt: int) -> str:
        return self.paths[i % len(self.paths)]


@dataclass
class Fresh:
    """`prefix` + a MAC never asked before in this run (no group has it: the default group's config is
    then new text, so the server renders and validates it for the first time)."""

    prefix: str

    def lua(self, salt: int) -> str:
        return LUA_FRESH % (json.dumps(self.prefix), salt) + LUA_DONE

    def path(self, i: int, salt: int) -> str:
        return f"{self.prefix}02-{salt % 256:02x}-" + "-".join(f"{i >> s & 0xff:02x}" for s in (24, 16, 8, 0))


@dataclass
class Cell:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx/3xx answers plus socket errors
    cpu_us: float  # server CPU per answered request
    body: int  # bytes of one answer body (one of its URLs)


# --- fixtures ----------------------------------------------------------------------------------------

def _mac(i: int) -> str:
    return f"52:54:00:aa:{i >> 8 & 0xff:02x}:{i & 0xff:02x}"


def make_data(root: Path, groups: int) -> list[str]:
    """Copy the example data folder and add MAC groups up to `groups`; return their MACs."""
    data = root / "data"
    for sub in ("profiles", "groups", "cloud", "generic"):
        shutil.copytree(EXAMPLE / sub, data / sub)
    macs = [json.loads((p).read_text())["selector"]["mac"] for p in sorted((data / "groups").glob("*.json"))
            if json.loads(p.read_text())["selector"].get("mac")]
    for i in range(groups - len(macs)):
        mac = _mac(i)
        (data / "groups" / f"host-{i:04d}.json").write_text(json.dumps({
            "id": f"host-{i:04d}", "name": f"bench host {i}", "profile": "tiny", "selector": {"mac": mac},
            "metadata": {"hostname": f"host-{i:04d}", "role": "worker", "update_group": "stable",
                         "reboot_strategy": "etcd-lock", "etcd_endpoints": "http://10.0.0.11:2379"}}, indent=2))
        macs.append(mac)
    # The store does not cache a file changed in the last 2 s (racy timestamps); a data folder that has
    # been in place for a while is the case to measure, so age the files.
    old = time.time() - 3600
    for p in data.rglob("*"):
        os.utime(p, (old, old))
    return macs


def make_assets(root: Path, release_root: Path) -> tuple[Path, str]:
    """Assets folder: the PXE releases under `release_root` (hard links) and a 1 KiB static file."""
    assets = root / "assets"
    name = release_root.name
    versions = [d for d in release_root.iterdir() if (d / "release.json").is_file()] if release_root.is_dir() else []
    if not versions:
        raise SystemExit(f"error: no release under {release_root}; build one with "
                         f"'obelisk image build images/{name}.toml --format raw,pxe'")
    for d in versions:
        dest = assets / name / d.name
        dest.mkdir(parents=True)
        for f in ("release.json", "vmlinuz", "initrd"):
            if (d / f).is_file():
                try:
                    os.link(d / f, dest / f)
                except OSError:
                    shutil.copyfile(d / f, dest / f)
    static = assets / "static/1k.bin"
    static.parent.mkdir(parents=True)
    static.write_bytes(random.Random(1).randbytes(1024))
    return assets, "/assets/static/1k.bin"


def url_lists(macs: list[str], n: int = 400) -> dict[str, Rotate]:
    rnd = random.Random(7)
    mixed = []
    for i in range(n):
        if i % 2 == 0:
            mac = rnd.choice(macs)  # a group's MAC
        else:
            mac = f"02:00:{rnd.randrange(1 << 32):08x}"  # locally administered: no group, so the default
            mac = ":".join(mac.replace(":", "")[j:j + 2] for j in range(0, 12, 2))
        mixed.append(mac.replace(":", "-"))  # iPXE's ${mac:hexhyp}, what /boot.ipxe sends
    return {"ipxe": Rotate([f"/ipxe?mac={m}" for m in mixed]), "cloud": Rotate([f"/cloud?mac={m}" for m in mixed])}


# --- the server ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data: Path, assets: Path, port: int, extra: list[str], pythonpath: str | None,
                 log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "obelisk"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-c", "from obelisk.cli import main; main()"]
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # Logs to a file: formatting and writing them per request is part of what is measured.
    return subprocess.Popen([*cmd, "provision", "serve", "--data", str(data), "--assets", str(assets),
                             "--listen", f"127.0.0.1:{port}", *extra],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)


def wait_ready(base: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            if requests.get(base + "/health", timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise SystemExit(f"error: the server did not answer within 30 s:\n{log.read_text()[-2000:]}")


def proc_status(pid: int, field: str) -> int:
    """A /proc/PID/status figure in KiB (VmHWM: peak RSS; VmRSS: now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


# --- load generators -----------------------------------------------------------------------------------

def run_wrk(wrk: str, base: str, urls: Rotate | Fresh, conns: int, threads: int, duration: float,
            script_dir: Path, salt: int = 0) -> tuple[int, float, float, float, int]:
    """(requests, rps, p50 ms, p99 ms, errors)."""
    script = script_dir / "urls.lua"
    script.write_text(urls.lua(salt))
    t = max(1, min(threads, conns))
    out = subprocess.run([wrk, "-t", str(t), "-c", str(conns), "-d", f"{duration:g}s", "--timeout", "10s",
                          "--latency", "-s", str(script), base], capture_output=True, text=True, check=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out.stdout}\n{out.stderr}")
    r = json.loads(line[len("BENCHJSON "):])
    errors = r["connect"] + r["read"] + r["write"] + r["timeout"] + r["status"]
    return r["requests"], r["requests"] / (r["duration_us"] / 1e6), r["p50"] / 1000, r["p99"] / 1000, errors


async def _py_load(port: int, urls: Rotate | Fresh, conns: int, duration: float,
                   salt: int) -> tuple[list[float], int, float]:
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + duration

    async def worker(k: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k << 24 | 1
        try:
            while time.perf_counter() < stop:
                path = urls.path(i, salt)
                i += 1
                t = time.perf_counter()
                writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for h in head.split(b"\r\n"):
                    if h[:15].lower() == b"content-length:":
                        length = int(h[15:])
                await reader.readexactly(length)
                lat.append(time.perf_counter() - t)
                if not head.startswith(b"HTTP/1.1 2"):
                    errors += 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(conns)))
    return lat, errors, time.perf_counter() - t0


def run_python(port: int, urls: Rotate | Fresh, conns: int, duration: float,
               salt: int = 0) -> tuple[int, float, float, float, int]:
    lat, errors, elapsed = asyncio.run(_py_load(port, urls, conns, duration, salt))
    lat.sort()
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [lat[0]] * 99
    return len(lat), len(lat) / elapsed, q[49] * 1000, q[98] * 1000, errors


# --- main ----------------------------------------------------------------------------------------------

def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench provision")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per (endpoint, concurrency) cell")
    ap.add_argument("--concurrency", default="1,8,32,64", help="comma-separated connection counts")
    ap.add_argument("--groups", type=int, default=200, help="MAC groups in the data folder (plus the default)")
    ap.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    ap.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (the machine's cores are shared)")
    ap.add_argument("--release", type=Path, default=REPO / "out/tiny", help="folder of PXE releases to serve")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `provision serve` argument")
    ap.add_argument("--pythonpath", default=None, help="prepended to the server's PYTHONPATH")
    ap.add_argument("--endpoints", default=",".join(ENDPOINTS), help=f"subset of {','.join(ENDPOINTS)}")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    endpoints = [e for e in args.endpoints.split(",") if e]

    wrk = shutil.which("wrk")
    if args.loadgen == "wrk" and wrk is None:
        raise SystemExit("error: wrk is not installed (apt-get install wrk)")
    use_wrk = wrk is not None and args.loadgen != "python"
    work = Path(tempfile.mkdtemp(prefix="obelisk-bench-provision-"))
    proc = None
    try:
        macs = make_data(work, args.groups)
        assets, static_path = make_assets(work, args.release)
        urls: dict[str, Rotate | Fresh] = {"static": Rotate([static_path]), **url_lists(macs),
                                           "cloud-new": Fresh("/cloud?mac="), "floor": Rotate(["/health"])}
        unknown = [e for e in endpoints if e not in urls]
        if unknown:
            raise SystemExit(f"error: unknown endpoint(s) {', '.join(unknown)}: choose from {', '.join(ENDPOINTS)}")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = work / "server.log"
        proc = start_server(work / "data", assets, port, args.server_arg, args.pythonpath, log)
        wait_ready(base, proc, log)
        rss_idle = proc_status(proc.pid, "VmRSS")
        bodies = {}
        for name, u in urls.items():  # correctness and warm-up: every listed URL answers 200 once
            for p in u.paths if isinstance(u, Rotate) else [u.path(i, 255) for i in range(3)]:
                r = requests.get(base + p, timeout=5)
                if r.status_code != 200:
                    raise SystemExit(f"error: GET {p} -> {r.status_code}: {r.text[:300]}")
                bodies[name] = len(r.content)
        gen = (f"wrk ({subprocess.run([wrk, '-v'], capture_output=True, text=True).stdout.split()[1]}, "
               f"{args.wrk_threads} thread(s), Lua URL rotation)" if use_wrk
               else "python asyncio keep-alive client in the bench process" +
               (" (wrk not installed)" if wrk is None else ""))
        rotating = len(urls["ipxe"].paths)  # type: ignore[union-attr]
        print(f"server pid {proc.pid} on {base}: {args.groups} MAC groups + default; {rotating} URLs per "
              f"endpoint, half matched by a group, half falling to the default; cloud-new: a new MAC per "
              f"request; load generator: {gen}; "
              f"{args.duration:g} s per cell; {os.cpu_count()} CPUs shared by server and load generator; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        if args.server_arg or args.pythonpath:
            print(f"server variant: args {args.server_arg} pythonpath {args.pythonpath}", flush=True)

        results: dict[tuple[str, int], Cell] = {}
        for salt, (c, name) in enumerate(((c, name) for c in levels for name in endpoints), start=1):
            cpu0 = cpu_seconds(proc.pid)
            if use_wrk:
                n, rps, p50, p99, err = run_wrk(wrk, base, urls[name], c, args.wrk_threads, args.duration, work,
                                                salt)
            else:
                n, rps, p50, p99, err = run_python(port, urls[name], c, args.duration, salt)
            cpu = cpu_seconds(proc.pid) - cpu0
            results[(name, c)] = Cell(rps, p50, p99, n, err, cpu / max(n, 1) * 1e6, bodies[name])
            print(f"  c={c:<3} {name:9s} {rps:8.0f} rps  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  "
                  f"errors {err}", flush=True)
        if proc.poll() is not None:
            raise SystemExit(f"error: the server died during the run:\n{log.read_text()[-2000:]}")
        peak = proc_status(proc.pid, "VmHWM")

        table = Table(title=f"obelisk provision serve, {args.groups} groups + default, load: "
                            f"{'wrk' if use_wrk else 'python'}; ratios ours/static at the same concurrency")
        for col in ("conc", "endpoint", "body B", "req/s", "rps ratio", "p50 ms", "p99 ms", "p99 ratio",
                    "srv CPU/req µs", "CPU ratio", "errors"):
            table.add_column(col, justify="left" if col == "endpoint" else "right", no_wrap=col == "endpoint")
        for c in levels:
            st = results.get(("static", c))
            for name in endpoints:
                r = results[(name, c)]
                own = name in ("static", "floor") or st is None

                def ratio(a: float, b: float, own: bool = own) -> str:
                    return "—" if own or b <= 0 else f"{a / b:.2f}"
                label = {"static": "static 1 KiB (baseline)", "floor": "floor /health",
                         "cloud-new": "cloud, new MAC each"}.get(name, name)
                table.add_row(str(c), label, str(r.body),
                              f"{r.rps:,.0f}", ratio(r.rps, st.rps if st else 0), f"{r.p50_ms:.2f}",
                              f"{r.p99_ms:.2f}", ratio(r.p99_ms, st.p99_ms if st else 0), f"{r.cpu_us:.0f}",
                              ratio(r.cpu_us, st.cpu_us if st else 0), str(r.errors),
                              end_section=name == endpoints[-1])
        Console(highlight=False, width=max(120, shutil.get_terminal_size().columns)).print(table)
        total = sum(r.requests for r in results.values())
        print(f"server RSS: {rss_idle / 1024:.1f} MiB after start-up, peak (VmHWM) {peak / 1024:.1f} MiB; "
              f"server log (access lines and the app's) {log.stat().st_size / 1e6:.1f} MB over {total:,} "
              f"requests; load average at the end {os.getloadavg()[0]:.1f}")
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
