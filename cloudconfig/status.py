"""`obelisk cloudconfig status`: did what cloud-config set up come up, and if not, why.

cloud-config writes etcd's settings and queues its start without waiting (it runs before
etcd.service), so a setting etcd itself refuses (a peer address the host does not have, a bad
cluster token) shows only once etcd tries. This reads the state of the units cloud-config drives
from systemd and, for a failed one, the line of its journal that says why, so the operator sees
the reason next to what to change. Reading only: nothing is changed."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from cloudconfig.bootstrap import ETCD_ENV

# Units cloud-config drives on every host; etcd only once a config gave it settings.
BASE_UNITS = ("obelisk-cloudconfig.service", "obelisk-ignition.service", "obelisk-update.service")
ERRORISH = re.compile(r"error|cannot|can't|failed|fatal|critical|invalid|refus|denied|no such", re.I)
SYSTEMD_NOISE = re.compile(r"^(Started|Starting|Stopped|Stopping|Failed to start|Scheduled restart|"
                           r"\S+\.service: (Main process exited|Failed with result|Consumed|Deactivated))")
HINTS = {
    "etcd.service": "fix coreos.etcd2 in the user-data (addresses must be this host's own), then run "
                    "'obelisk cloudconfig apply'",
    "obelisk-cloudconfig.service": "run 'obelisk cloudconfig validate' on the user-data and fix what it names",
    "obelisk-ignition.service": "fix the Ignition config; it runs on the first boot only",
}


@dataclass
class UnitState:
    unit: str
    active: str  # ActiveState: active, failed, inactive, activating...
    result: str  # Result: success, exit-code, timeout...
    reason: str = ""  # the journal line that says why (failed units only)
    hint: str = ""

    @property
    def ok(self) -> bool:
        return self.active != "failed"

    def line(self) -> str:
        text = f"{self.unit}: {self.active}"
        if self.result and self.result != "success":
            text += f" ({self.result})"
        if self.reason:
            text += f": {self.reason}"
        if self.hint and not self.ok:
            text += f"; {self.hint}"
        return text


def reason_from_journal(lines: list[str]) -> str:
    """The last journal line that reads like an error (not systemd's own start/stop lines), bounded."""
    candidates = [ln.strip() for ln in lines if ln.strip() and not SYSTEMD_NOISE.match(ln.strip())]
    errors = [ln for ln in candidates if ERRORISH.search(ln)]
    pick = (errors or candidates or [""])[-1]
    return "".join(c if c.isprintable() else "?" for c in pick)[:300]


def parse_show(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


Runner = Callable[[list[str]], str]


def units_to_check(root: Path = Path("/")) -> list[str]:
    units = list(BASE_UNITS)
    if (root / ETCD_ENV.lstrip("/")).exists():
        units.insert(0, "etcd.service")
    return units


def unit_state(unit: str, run: Runner) -> UnitState:
    props = parse_show(run(["systemctl", "show", "-p", "ActiveState,Result,LoadState", unit]))
    st = UnitState(unit, props.get("ActiveState", "unknown"), props.get("Result", ""), hint=HINTS.get(unit, ""))
    if props.get("LoadState") == "not-found":
        st.active = "not-installed"
    if not st.ok:
        journal = run(["journalctl", "-u", unit, "-b", "--no-pager", "-o", "cat", "-n", "40"])
        st.reason = reason_from_journal(journal.splitlines())
    return st


def status(run: Runner, root: Path = Path("/")) -> list[UnitState]:
    return [unit_state(u, run) for u in units_to_check(root)]


def to_json(states: list[UnitState]) -> dict:
    return {"ok": all(s.ok for s in states), "units": [{**asdict(s), "ok": s.ok} for s in states]}
