"""obelisk/tools.py: the one wrapper around system tools, run for real."""

from __future__ import annotations

import pytest

from obelisk import tools
from obelisk.errors import ObeliskError


def test_missing_tool_names_the_package() -> None:
    tools.TOOL_PACKAGES["obelisk-no-such-tool"] = "obelisk-pkg"
    with pytest.raises(tools.ToolMissing, match="apt-get install obelisk-pkg"):
        tools.run(["obelisk-no-such-tool"])


def test_failing_tool_carries_its_message() -> None:
    with pytest.raises(tools.ToolError, match="sh failed: boom"):
        tools.run(["sh", "-c", "echo boom >&2; exit 3"])


def test_tool_errors_are_obelisk_errors() -> None:
    with pytest.raises(ObeliskError):
        tools.run(["sh", "-c", "exit 1"])


@pytest.mark.timeout(20)
def test_a_tool_that_hangs_is_stopped_at_its_deadline() -> None:
    with pytest.raises(tools.ToolError, match="did not finish within 1s"):
        tools.run(["sleep", "30"], timeout=1)
