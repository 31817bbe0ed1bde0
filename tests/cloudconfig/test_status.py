"""`obelisk cloudconfig status`: unit states and the journal line that says why one failed; and the
etcd start/enable that apply queues on the live host. systemctl/journalctl answers are canned text
here (the tests cannot run a systemd); the real ones are read in the VM host scenario."""

from __future__ import annotations

from pathlib import Path

from cloudconfig import bootstrap, status
from cloudconfig.model import CloudConfig
from cloudconfig.rootfs import Plan

ETCD_JOURNAL = """Starting etcd - highly-available key value store...
{"level":"info","msg":"configuring peer listeners","listen-peer-urls":["http://192.0.2.1:2380"]}
{"level":"error","msg":"creating peer listener failed",\
"error":"listen tcp 192.0.2.1:2380: bind: cannot assign requested address"}
etcd.service: Main process exited, code=exited, status=1/FAILURE
etcd.service: Failed with result 'exit-code'.
Failed to start etcd - highly-available key value store.
"""


def fake_systemd(states: dict[str, str], journals: dict[str, str]) -> status.Runner:
    def run(argv: list[str]) -> str:
        unit = argv[-1] if argv[0] == "systemctl" else argv[argv.index("-u") + 1]
        if argv[0] == "systemctl":
            active = states.get(unit, "inactive")
            result = "exit-code" if active == "failed" else "success"
            return f"ActiveState={active}\nResult={result}\nLoadState=loaded\n"
        return journals.get(unit, "")
    return run


def test_failed_etcd_names_the_reason_and_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "etc/obelisk").mkdir(parents=True)
    (tmp_path / "etc/obelisk/etcd.env").write_text("ETCD_NAME=x\n")
    run = fake_systemd({"etcd.service": "failed", "obelisk-cloudconfig.service": "active"},
                       {"etcd.service": ETCD_JOURNAL})
    states = status.status(run, tmp_path)
    etcd = states[0]
    assert etcd.unit == "etcd.service" and not etcd.ok
    assert "192.0.2.1:2380: bind: cannot assign requested address" in etcd.reason
    line = etcd.line()
    assert line.startswith("etcd.service: failed (exit-code): ") and "fix coreos.etcd2" in line
    assert status.to_json(states)["ok"] is False


def test_without_etcd_settings_etcd_is_not_checked(tmp_path: Path) -> None:
    states = status.status(fake_systemd({"obelisk-update.service": "active"}, {}), tmp_path)
    assert [s.unit for s in states] == list(status.BASE_UNITS) and all(s.ok for s in states)


def test_reason_is_bounded_and_printable() -> None:
    assert status.reason_from_journal(["error: " + "\x1b[31m" * 10 + "x" * 1000]).count("?") == 10
    assert len(status.reason_from_journal(["fatal " + "y" * 5000])) == 300
    assert status.reason_from_journal([]) == ""
    assert status.reason_from_journal(["Started x.", "just a line"]) == "just a line"


def _cfg(**etcd: str) -> CloudConfig:
    return CloudConfig(etcd=dict(etcd))


def test_apply_enables_and_starts_etcd_live_only(tmp_path: Path) -> None:
    plan = Plan(tmp_path)
    bootstrap.plan_etcd(plan, _cfg(name="a"), live=False)
    assert plan.commands == []
    plan = Plan(tmp_path)
    bootstrap.plan_etcd(plan, _cfg(name="a"), live=True)
    assert ["systemctl", "enable", "etcd.service"] in plan.commands
    assert ["systemctl", "--no-block", "restart", "etcd.service"] in plan.commands  # settings are new
    plan.commit()
    again = Plan(tmp_path)
    bootstrap.plan_etcd(again, _cfg(name="a"), live=True)
    assert again.changes == [] and ["systemctl", "--no-block", "start", "etcd.service"] in again.commands
