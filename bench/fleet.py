"""Fleet roll-out through the etcd semaphore: `python -m bench fleet [--hosts N] [--slots K] [--reboot S]`.

Starts a throw-away single-member etcd on loopback, then:
1. lock round trips: one client doing lock+unlock cycles back to back (CAS txns per second);
2. the fleet: N host threads running the real RebootCoordinator (etcd-lock), each "reboot" a sleep;
   reports the added latency per host (the successful lock call + the release), the wait for a
   slot, and the total time to roll the fleet against the ideal (hosts / k x reboot time) and
   against an in-process baseline (the same threads on a threading.BoundedSemaphore(k): no etcd,
   no polling), as ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from update_engine.reboot.etcd_local import LocalEtcd
from update_engine.reboot.semaphore import EtcdEndpoints, EtcdSemaphore
from update_engine.reboot.simulate import holders_history, median, percentile, run_fleet


def round_trips(endpoints: str, cycles: int) -> float:
    sem = EtcdSemaphore(EtcdEndpoints(endpoints), "bench-rtt")
    sem.set_max(1)
    t = time.perf_counter()
    for _ in range(cycles):
        sem.lock("solo")
        sem.unlock("solo")
    return 2 * cycles / (time.perf_counter() - t)


def in_process_baseline(hosts: int, slots: int, reboot: float) -> float:
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


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench fleet")
    ap.add_argument("--hosts", type=int, default=200)
    ap.add_argument("--slots", type=int, default=5)
    ap.add_argument("--reboot", type=float, default=0.2, help="seconds each simulated reboot takes")
    ap.add_argument("--retry-max", type=float, default=2.0, help="longest back-off between lock attempts")
    ap.add_argument("--cycles", type=int, default=200, help="lock+unlock cycles for the round-trip figure")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="obelisk-bench-fleet-") as tmp, LocalEtcd(Path(tmp), 1) as etcd:
        rtt = round_trips(etcd.endpoints, args.cycles)
        print(f"lock round trips: {rtt:.0f}/s (single client, lock+unlock CAS txns on one etcd member)")

        EtcdSemaphore(EtcdEndpoints(etcd.endpoints), "fleet").set_max(args.slots)
        columns = (TextColumn("rolling fleet"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns) as progress:
            task = progress.add_task("fleet", total=args.hosts)
            t = time.perf_counter()
            results, tracker = run_fleet(etcd.endpoints, "fleet", args.hosts, args.reboot, retry_min=0.05,
                                         retry_max=args.retry_max, timeout=5.0,
                                         on_progress=lambda n: progress.update(task, completed=n))
            total = time.perf_counter() - t
        history = holders_history(etcd.endpoints, "fleet")

    baseline = in_process_baseline(args.hosts, args.slots, args.reboot)
    ideal = args.hosts / args.slots * args.reboot
    added = [r.lock_call + r.release_call for r in results if r.rebooted]
    waits = [r.wait for r in results if r.rebooted]
    attempts = sum(r.lock_attempts for r in results)
    ok = sum(r.rebooted for r in results)
    print(f"fleet: {ok}/{args.hosts} hosts rebooted, k={args.slots}, reboot={args.reboot}s, "
          f"peak simultaneous reboots {tracker.peak}, max holders in etcd history "
          f"{max((n for _, _, n in history), default=0)} over {len(history)} semaphore versions")
    print(f"lock attempts during the roll: {attempts} ({attempts / total:.0f}/s), "
          f"{attempts / max(ok, 1):.1f} per host")
    locks = [r.lock_call for r in results if r.rebooted]
    releases = [r.release_call for r in results if r.rebooted]
    print(f"added latency per host (lock + release round trips): median {median(added) * 1000:.1f} ms, "
          f"p99 {percentile(added, 99) * 1000:.1f} ms (lock median {median(locks) * 1000:.1f} ms "
          f"p99 {percentile(locks, 99) * 1000:.1f} ms; release median {median(releases) * 1000:.1f} ms "
          f"p99 {percentile(releases, 99) * 1000:.1f} ms)")
    print(f"wait for a slot: median {median(waits):.2f} s, p99 {percentile(waits, 99):.2f} s")
    print(f"roll time {total:.2f} s; ideal (hosts/k x reboot) {ideal:.2f} s -> ratio {total / ideal:.2f}; "
          f"in-process semaphore baseline {baseline:.2f} s -> ratio {total / baseline:.2f}")
