"""The daemon's node-exporter textfile: written after every state change of a real run (against the
scriptable loopback server), parsed back with prometheus_client's own parser; where it goes
(METRICS_TEXTFILE, the collector folders, off); written atomically with mode 0644."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from ue_helpers import World

from obelisk.update_conf import UpdateConf, UpdateConfigError
from update_engine.daemon import Daemon
from update_engine.metrics import AgentMetrics
from update_engine.state import DaemonState, Status

P = "obelisk_update_agent_"


def samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a textfile, through prometheus_client's parser."""
    out = {}
    for fam in text_string_to_metric_families(path.read_text()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def one(got: dict, name: str, **labels: str) -> float:
    return got[(P + name, tuple(sorted(labels.items())))]


def states(got: dict) -> dict[str, float]:
    return {dict(k[1])["state"]: v for k, v in got.items() if k[0] == P + "state"}


def with_textfile(h, path: str) -> None:  # noqa: ANN001 - ue_helpers.Host
    conf = h.root / "update.conf"
    conf.write_text(conf.read_text() + f"METRICS_TEXTFILE={path}\n")


@pytest.mark.timeout(120)
def test_a_staging_run_leaves_its_numbers_in_the_textfile(world: World, fake_server, host, tmp_path: Path) -> None:
    fake_server.script.payload = world.build("1.1.0", seed=2).payload.read_bytes()
    h = host(fake_server.url)
    prom = tmp_path / "collector" / "obelisk.prom"
    with_textfile(h, str(prom))
    d = Daemon(h.options())
    seen: list[dict[str, float]] = []
    d.machine.notify = lambda st: (d._notify(st), seen.append(states(samples(prom))))
    assert d.run_once() == 0
    got = samples(prom)
    print(prom.read_text())
    # One-hot after every move, and the run's chain is what the file showed along the way.
    assert all(sorted(s.values()) == [0.0] * (len(Status) - 1) + [1.0] for s in seen)
    shown = [next(k for k, v in s.items() if v == 1.0) for s in seen]
    chain = [x for i, x in enumerate(shown) if i == 0 or shown[i - 1] != x]
    assert chain == ["IDLE", "CHECKING_FOR_UPDATE", "UPDATE_AVAILABLE", "DOWNLOADING", "VERIFYING", "FINALIZING",
                     "UPDATED_NEED_REBOOT"]
    assert states(got)["UPDATED_NEED_REBOOT"] == 1.0 and set(states(got)) == {s.value for s in Status}
    assert one(got, "reboot_pending") == 1.0
    assert one(got, "update_checks_total") == 1.0 and one(got, "update_checks_errors_total") == 0.0
    assert one(got, "updates_staged_total") == 1.0 and one(got, "update_failures_total") == 0.0
    data_size = world.build("1.1.0").manifest.data_size
    assert one(got, "downloaded_bytes_total") == data_size, data_size
    assert one(got, "download_progress_ratio") == 1.0
    assert one(got, "staged_info", version="1.1.0", slot=d.st.staged_slot) == 1.0
    assert one(got, "os_info", version="1.0.0", group="stable") == 1.0
    assert one(got, "updates_enabled") == 1.0 and one(got, "reboot_strategy", strategy="off") == 1.0
    assert one(got, "last_refresh_timestamp") == pytest.approx(d.st.last_checked)
    assert 0 < one(got, "last_check_timestamp") <= one(got, "last_refresh_timestamp")
    assert one(got, "latest_state_change_timestamp") >= one(got, "last_check_timestamp")
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644
    assert os.listdir(prom.parent) == ["obelisk.prom"]  # no temporary left behind


@pytest.mark.timeout(120)
def test_a_failed_check_counts_as_a_check_error(world: World, fake_server, host, tmp_path: Path) -> None:
    fake_server.script.omaha_status = 500
    h = host(fake_server.url)
    prom = tmp_path / "obelisk.prom"
    with_textfile(h, str(prom))
    d = Daemon(h.options())
    assert d.run_once() == 1
    got = samples(prom)
    assert states(got)["IDLE"] == 1.0 and one(got, "reboot_pending") == 0.0
    assert one(got, "update_checks_total") == 1.0 and one(got, "update_checks_errors_total") == 1.0
    assert one(got, "update_failures_total") == 1.0 and one(got, "consecutive_failures") == 1.0
    assert one(got, "last_refresh_timestamp") == 0.0 and one(got, "last_check_timestamp") > 0
    assert not [k for k in got if k[0] == P + "staged_info"]
    fake_server.script.omaha_status, fake_server.script.noupdate = 200, True
    assert d.run_once() == 0
    got = samples(prom)
    assert one(got, "update_checks_total") == 2.0 and one(got, "update_checks_errors_total") == 1.0
    assert one(got, "consecutive_failures") == 0.0 and one(got, "last_refresh_timestamp") > 0


@pytest.mark.timeout(120)
def test_the_collector_folder_is_found_or_the_file_is_skipped(fake_server, host, tmp_path: Path) -> None:
    fake_server.script.noupdate = True
    h = host(fake_server.url)
    missing, present = tmp_path / "node_exporter", tmp_path / "prometheus"
    present.mkdir()
    opts = dataclasses.replace(h.options(), textfile_dirs=(missing, present))
    assert Daemon(opts).run_once() == 0
    assert not missing.exists() and one(samples(present / "obelisk.prom"), "update_checks_total") == 1.0
    # No collector folder anywhere: nothing is written (and nothing made).
    (present / "obelisk.prom").unlink()
    present.rmdir()
    assert Daemon(opts).run_once() == 0
    assert not missing.exists() and not present.exists()
    # off: nothing, even where a folder exists; a file written before is removed when switched off.
    present.mkdir()
    d = Daemon(opts)
    assert d.run_once() == 0 and (present / "obelisk.prom").exists()
    with_textfile(h, "off")
    assert d.run_once() == 0 and os.listdir(present) == []


def test_a_textfile_that_cannot_be_written_never_stops_the_daemon(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    (tmp_path / "file").write_text("")
    m = AgentMetrics(search=())
    m.configure(UpdateConf(metrics_textfile=str(tmp_path / "file" / "obelisk.prom")), DaemonState())
    m.observe(DaemonState(state=Status.CHECKING_FOR_UPDATE))
    m.observe(DaemonState(state=Status.IDLE))
    assert m.checks == 1 and m.check_errors == 1
    assert sum("cannot write the metrics textfile" in r.message for r in caplog.records) == 1


def test_download_bytes_count_only_what_was_fetched() -> None:
    m = AgentMetrics(search=())
    st = DaemonState()
    m.observe(DaemonState(state=Status.CHECKING_FOR_UPDATE))
    m.observe(DaemonState(state=Status.UPDATE_AVAILABLE, last_checked=1e12))
    m.observe(DaemonState(state=Status.DOWNLOADING))
    for done in (4096, 8192, 12288):  # resumed at 4096: those bytes were on the slot already
        m.download_progress(done, st)
    m.download_progress(0, st)  # the slot changed under a resume: it starts over from 0
    m.download_progress(100, st)
    assert m.downloaded == 8192 + 100 and m.check_errors == 0


@pytest.mark.parametrize("value", ["metrics.prom", "/var/lib/x/metrics.txt", "/a b.prom", "/x/.prom", "on"])
def test_bad_metrics_textfile_values_are_one_line(value: str) -> None:
    with pytest.raises(UpdateConfigError, match="^update.conf: METRICS_TEXTFILE: .*ending in .prom") as e:
        UpdateConf.parse(f"METRICS_TEXTFILE={value}\n")
    assert "\n" not in str(e.value)
    assert UpdateConf.parse("METRICS_TEXTFILE=/var/lib/node_exporter/textfile_collector/o.prom\n").render() \
        .endswith("METRICS_TEXTFILE=/var/lib/node_exporter/textfile_collector/o.prom\n")
