"""The update daemon's Prometheus metrics, written as a node-exporter textfile (`obelisk.prom`).

Where: update.conf's `METRICS_TEXTFILE=/path/NAME.prom`; without it, `obelisk.prom` in the first
textfile-collector folder that exists (`/var/lib/node_exporter/textfile_collector`, then Debian's
`/var/lib/prometheus/node-exporter`), and nowhere when none does; `METRICS_TEXTFILE=off` writes
nothing. The file is rewritten after every state change (and at most every 15 s while a download
runs), through obelisk.atomicfile: fsync'd, mode 0644 whatever the umask, its temporary a dot file
that the collector never reads (prometheus_client's write_to_textfile renames too, but neither
fsyncs nor sets the mode). prometheus-client is one of obelisk's dependencies, which the image's
python stage installs into every host's /usr.

Names follow Zincati's `zincati_update_agent_*` (anchors-2026.md §5). Counters count what this
daemon process did since it started (a restart resets them, as Zincati's do); gauges come from
the persisted state:

- `obelisk_update_agent_state{state}`                        gauge, one-hot over every daemon state
- `obelisk_update_agent_latest_state_change_timestamp`       gauge, seconds (daemon start until a change)
- `obelisk_update_agent_last_check_timestamp`                gauge: last update check started (0: none yet)
- `obelisk_update_agent_last_refresh_timestamp`              gauge: last update check that got an answer
- `obelisk_update_agent_update_checks_total`                 counter (Zincati's `update_checks_total`)
- `obelisk_update_agent_update_checks_errors_total`          counter: checks that got no answer
- `obelisk_update_agent_update_failures_total`               counter: runs that ended in an error event
- `obelisk_update_agent_updates_staged_total`                counter: updates staged into the passive slot
- `obelisk_update_agent_downloaded_bytes_total`              counter: payload bytes fetched (not resumed ones)
- `obelisk_update_agent_download_progress_ratio`             gauge 0..1
- `obelisk_update_agent_consecutive_failures`                gauge (the error backoff's count)
- `obelisk_update_agent_reboot_pending`                      gauge 0/1: staged, waiting for the reboot
- `obelisk_update_agent_rolled_back_versions`                gauge: versions that rolled back here (never retaken)
- `obelisk_update_agent_updates_enabled`                     gauge 0/1: an update server is configured
- `obelisk_update_agent_reboot_strategy{strategy}`           gauge 1 (Zincati's `updates_strategy_mode`)
- `obelisk_update_agent_os_info{version,group}`              gauge 1 (Zincati's `identity_os_info`)
- `obelisk_update_agent_staged_info{version,slot}`           gauge 1, only while an update is staged
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from obelisk import update_conf as config
from obelisk.atomicfile import write_atomic
from update_engine.state import DaemonState, Status

log = logging.getLogger("obelisk.update")

TEXTFILE_MODE = 0o644  # node-exporter runs as its own user
PROGRESS_WRITE_EVERY = 15.0  # seconds between rewrites while a download runs (moves always rewrite)


class AgentMetrics:
    """What the daemon's state changes and downloads add up to, and the textfile that shows it."""

    def __init__(self, state: str = Status.IDLE, *, clock: Callable[[], float] = time.time,
                 search: tuple[Path, ...] = config.TEXTFILE_DIRS) -> None:
        self.clock, self.search = clock, search
        self.lock = threading.Lock()
        self.path: Path | None = None
        self.conf: config.UpdateConf | None = None
        self.st: DaemonState | None = None
        self.last_state = str(state)
        self.state_changed_at = clock()
        self.check_started_at = 0.0
        self.checks = self.check_errors = self.failures = self.staged = self.downloaded = 0
        self._done: int | None = None  # the download's position at its last progress report
        self._written_at = 0.0
        self._failed_path: Path | None = None  # warn once per path, not on every state change

    # ------------------------------------------------------------ what the daemon tells it

    def configure(self, conf: config.UpdateConf, st: DaemonState) -> None:
        """update.conf as a run read it: where the textfile goes, and the labels it carries."""
        with self.lock:
            path = conf.textfile_path(self.search)
            if self.path is not None and path != self.path:
                self.path.unlink(missing_ok=True)  # moved or switched off: no stale numbers left behind
            self.path, self.conf = path, conf
            self._write(st)

    def observe(self, st: DaemonState) -> None:
        """Called after every state move (``StateMachine``'s notify): count, then rewrite the file."""
        with self.lock:
            now, here, to = self.clock(), self.last_state, str(st.state)
            if to != here:
                self.state_changed_at = now
                if here == Status.CHECKING_FOR_UPDATE and st.last_checked < self.check_started_at:
                    self.check_errors += 1  # left the check without an answer (an error, a stop, a crash)
                if to == Status.CHECKING_FOR_UPDATE:
                    self.checks += 1
                    self.check_started_at = now
                elif to == Status.DOWNLOADING:
                    self._done = None
                elif to == Status.REPORTING_ERROR_EVENT:
                    self.failures += 1
                elif to == Status.UPDATED_NEED_REBOOT and here == Status.FINALIZING:
                    self.staged += 1
            self.last_state = to
            self._write(st)

    def download_progress(self, done: int, st: DaemonState) -> None:
        """A download's position: what it moved forward since the last report was fetched. The first
        report of an attempt is where it resumes (those bytes were already on the slot)."""
        with self.lock:
            if self._done is not None and done > self._done:
                self.downloaded += done - self._done
            self._done = done
            if self.clock() - self._written_at >= PROGRESS_WRITE_EVERY:
                self._write(st)

    # ------------------------------------------------------------ the textfile

    def render(self, st: DaemonState) -> bytes:
        """The Prometheus text exposition of ``st`` and the counters."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Snapshot(list(self._families(st))))
        return generate_latest(registry)

    def _write(self, st: DaemonState) -> None:
        self.st = st
        if self.path is None:
            return
        try:
            write_atomic(self.path, self.render(st), mode=TEXTFILE_MODE)
        except OSError as exc:  # a full or read-only disk must not stop updates
            if self._failed_path != self.path:
                log.warning("cannot write the metrics textfile %s: %s", self.path, exc.strerror or exc)
                self._failed_path = self.path
            return
        self._failed_path = None
        self._written_at = self.clock()

    def _families(self, st: DaemonState) -> Iterator[Metric]:
        p = "obelisk_update_agent_"
        state = GaugeMetricFamily(p + "state", "The update daemon's state (1 for the current one)", labels=["state"])
        for s in Status:
            state.add_metric([s.value], 1.0 if str(st.state) == s.value else 0.0)
        yield state
        yield _gauge(p + "latest_state_change_timestamp", "When the daemon's state last changed (unix seconds)",
                     self.state_changed_at)
        yield _gauge(p + "last_check_timestamp", "When the last update check started (unix seconds, 0: none)",
                     self.check_started_at)
        yield _gauge(p + "last_refresh_timestamp", "When an update check last got an answer (unix seconds)",
                     st.last_checked)
        yield CounterMetricFamily(p + "update_checks", "Update checks started by this daemon", value=self.checks)
        yield CounterMetricFamily(p + "update_checks_errors", "Update checks that got no answer",
                                  value=self.check_errors)
        yield CounterMetricFamily(p + "update_failures", "Update runs that ended in an error event",
                                  value=self.failures)
        yield CounterMetricFamily(p + "updates_staged", "Updates staged into the passive slot", value=self.staged)
        yield CounterMetricFamily(p + "downloaded_bytes", "Payload bytes downloaded", value=self.downloaded)
        yield _gauge(p + "download_progress_ratio", "Progress of the current download (0 to 1)", st.progress)
        yield _gauge(p + "consecutive_failures", "Failed runs in a row (the error backoff)", st.consecutive_failures)
        yield _gauge(p + "reboot_pending", "1 when an update is staged and the reboot into it is due",
                     1.0 if st.state == Status.UPDATED_NEED_REBOOT else 0.0)
        yield _gauge(p + "rolled_back_versions", "Versions that rolled back on this host (never taken again)",
                     len(st.failed_versions))
        if self.conf is not None:
            yield _gauge(p + "updates_enabled", "1 when an update server is configured (SERVER=)",
                         1.0 if self.conf.server else 0.0)
            mode = GaugeMetricFamily(p + "reboot_strategy", "The reboot strategy (REBOOT_STRATEGY=)",
                                     labels=["strategy"])
            mode.add_metric([self.conf.reboot_strategy], 1.0)
            yield mode
        info = GaugeMetricFamily(p + "os_info", "The running version and update group", labels=["version", "group"])
        if st.current_version:
            info.add_metric([st.current_version, self.conf.group if self.conf else ""], 1.0)
        yield info
        staged = GaugeMetricFamily(p + "staged_info", "The update staged for the next boot", labels=["version", "slot"])
        if st.staged_version:
            staged.add_metric([st.staged_version, st.staged_slot or ""], 1.0)
        yield staged


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


class _Snapshot(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families
