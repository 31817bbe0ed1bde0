"""Fleet roll-out through the etcd semaphore: `python -m bench fleet [--hosts N] [--slots K] [--reboot S]`.

Starts a throw-away single-member etcd on loopback, then:
1. lock round trips: one client doing lock+unlock cycles back to back (each a CAS txn);
2. the fleet: N host threads running the real RebootCoordinator (etcd-lock), each "reboot" a sleep,
   waiting for a slot on an etcd watch of the group (obelisk's way); reports the added latency per
   host (the successful lock call + the release), the wait for a slot, and the roll time;
3. the baselines, in the same run and on the same etcd:
   - poll baseline: the same fleet with the watch switched off, so waiting hosts poll with
     exponential back-off (0.05 s doubling to --retry-max), as locksmith-style clients do and as
     obelisk did before the watch;
   - ideal: hosts / k x reboot time, what a perfect lock with zero hand-over time would take;
   - in-process floor: the same threads on a threading.BoundedSemaphore(k), no etcd at all: what
     zero-cost locking takes on this machine under its current load (threads waking late on a busy
     machine show up here, not as lock overhead).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from update_engine.reboot.semaphore import EtcdEndpoints, EtcdSemaphore

# The local etcd and the simulated fleet are test helpers (tests/etcdlib.py, tests/fleetsim.py): they
# do not ship in the package. The tests import them by these top-level names, and so does the bench.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from etcdlib import LocalEtcd  # noqa: E402
from fleetsim import HostResult, holders_history, median, percentile, run_fleet  # noqa: E402


def round_trips(endpoints: str, cycles: int) -> float:
    sem = EtcdSemaphore(EtcdEndpoints(endpoints), "bench-rtt")
    sem.set_max(1)
    t = time.perf_counter()
    for _ in range(cycles):
        sem.lock("solo")
        sem.unlock("solo")
    return 2 * cycles / (time.perf_counter() - t)


def in_process_floor(hosts: int, slots: int, reboot: float) -> float:
    gate = threading.BoundedSemaphore(slots)

    def host() -> None:
        with gate:
            time.sleep(reboot)

    threads = [threading.Thread(target=host) for _ in range(hosts)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t


def roll(endpoints: str, group: str, args: argparse.Namespace, *, watch: bool, label: str) -> float:
    """Roll the fleet once; print its figures; return the roll time."""
    EtcdSemaphore(EtcdEndpoints(endpoints), group).set_max(args.slots)
    columns = (TextColumn(f"rolling fleet ({label})"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("fleet", total=args.hosts)
        t = time.perf_counter()
        results, tracker = run_fleet(endpoints, group, args.hosts, args.reboot, retry_min=0.05,
                                     retry_max=args.retry_max, timeout=5.0, watch=watch,
                                     watch_fallback=args.watch_fallback, deadline=args.deadline,
                                     on_progress=lambda n: progress.update(task, completed=n))
        total = time.perf_counter() - t
    history = holders_history(endpoints, group)
    report(label, results, total, args, tracker.peak, max((n for _, _, n in history), default=0), len(history))
    return total


def report(label: str, results: list[HostResult], total: float, args: argparse.Namespace,
           peak: int, etcd_peak: int, versions: int) -> None:
    ok = [r for r in results if r.rebooted]
    added = [r.lock_call + r.release_call for r in ok]
    locks = [r.lock_call for r in ok]
    releases = [r.release_call for r in ok]
    waits = [r.wait for r in ok]
    attempts = sum(r.lock_attempts for r in results)
    ideal = args.hosts / args.slots * args.reboot
    ms = 1000
    print(f"[{label}] {len(ok)}/{args.hosts} hosts rebooted, k={args.slots}, reboot={args.reboot}s; peak "
          f"simultaneous reboots {peak}, max holders in etcd history {etcd_peak} over {versions} semaphore versions")
    print(f"[{label}] lock attempts {attempts} ({attempts / total:.0f}/s, {attempts / max(len(ok), 1):.1f} per host)")
    print(f"[{label}] added latency per host (lock + release calls): median {median(added) * ms:.1f} ms, "
          f"p99 {percentile(added, 99) * ms:.1f} ms (lock median {median(locks) * ms:.1f} ms "
          f"p99 {percentile(locks, 99) * ms:.1f} ms; release median {median(releases) * ms:.1f} ms "
          f"p99 {percentile(releases, 99) * ms:.1f} ms)")
    print(f"[{label}] wait for a slot: median {median(waits):.2f} s, p99 {percentile(waits, 99):.2f} s; "
          f"roll time {total:.2f} s -> {total / ideal:.2f}x ideal")


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench fleet")
    ap.add_argument("--hosts", type=int, default=200)
    ap.add_argument("--slots", type=int, default=5)
    ap.add_argument("--reboot", type=float, default=0.2, help="seconds each simulated reboot takes")
    ap.add_argument("--retry-max", type=float, default=2.0, help="longest back-off between lock attempts (polling)")
    ap.add_argument("--watch-fallback", type=float, default=10.0, help="longest wait on the watch before a re-read")
    ap.add_argument("--cycles", type=int, default=200, help="lock+unlock cycles for the round-trip figure")
    ap.add_argument("--no-baseline", action="store_true", help="skip the polling fleet (halves the run time)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="give up on a roll after this many seconds (default: 20x the ideal roll time, at least 120)")
    args = ap.parse_args(argv)

    ideal = args.hosts / args.slots * args.reboot
    if args.deadline is None:
        args.deadline = max(120.0, 20 * ideal)
    with tempfile.TemporaryDirectory(prefix="obelisk-bench-fleet-") as tmp, LocalEtcd(Path(tmp), 1) as etcd:
        rtt = round_trips(etcd.endpoints, args.cycles)
        print(f"lock round trips: {rtt:.0f}/s (one client, lock+unlock back to back, one etcd member)")
        ours = roll(etcd.endpoints, "fleet-watch", args, watch=True, label="watch")
        polled = None if args.no_baseline else roll(etcd.endpoints, "fleet-poll", args, watch=False,
                                                     label="poll baseline: watch off, back-off polling")
    floor = in_process_floor(args.hosts, args.slots, args.reboot)
    line = f"roll time {ours:.2f} s; ideal (hosts/k x reboot) {ideal:.2f} s -> ratio {ours / ideal:.2f}"
    if polled is not None:
        line += f"; poll baseline {polled:.2f} s -> {polled / ours:.2f}x faster with the watch"
    line += f"; in-process floor (BoundedSemaphore, no etcd) {floor:.2f} s -> ratio {ours / floor:.2f}"
    print(line)
