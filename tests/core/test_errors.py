"""obelisk/errors.py: the one error root and the CLI wrapper that prints it."""

from __future__ import annotations

import pytest
import typer

from obelisk.errors import EXIT_BAD_INPUT, ObeliskError, clean_errors


class _AreaError(ObeliskError, ValueError):
    default_hint = "run 'obelisk area fix'"
    exit_code = 3


def test_message_hint_and_code() -> None:
    e = _AreaError("disk.raw: bad header")
    assert str(e) == "disk.raw: bad header: run 'obelisk area fix'"
    assert e.exit_code == 3 and isinstance(e, ValueError)
    assert str(ObeliskError("plain")) == "plain" and ObeliskError("x").exit_code == EXIT_BAD_INPUT
    assert str(ObeliskError("m", hint="do y")) == "m: do y"
    assert ObeliskError("m", exit_code=1).exit_code == 1


def test_a_hint_already_in_the_message_is_not_repeated() -> None:
    assert str(_AreaError("bad: run 'obelisk area fix'")) == "bad: run 'obelisk area fix'"


def test_clean_errors_prints_one_line_and_exits_with_the_errors_code(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit) as exc, clean_errors():
        raise _AreaError("disk.raw: bad header")
    assert exc.value.exit_code == 3
    assert capsys.readouterr().err == "error: disk.raw: bad header: run 'obelisk area fix'\n"


def test_clean_errors_lets_bugs_through() -> None:
    """A bug (not an ObeliskError) keeps its traceback: the CLI does not hide it as bad input."""
    with pytest.raises(KeyError), clean_errors():
        raise KeyError("bug")


def test_every_error_class_of_obelisk_has_the_root_and_a_unique_name() -> None:
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    names: dict[str, list[str]] = {}
    for pkg in ("obelisk", "builder", "update_engine", "bootloader", "cloudconfig", "update_server",
                "fleetlock_server", "provision"):
        for path in (repo / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and (node.name.endswith("Error") or node.name.endswith("Exception")):
                    names.setdefault(node.name, []).append(str(path.relative_to(repo)))
    twice = {n: p for n, p in names.items() if len(p) > 1}
    assert not twice, f"error classes defined more than once: {twice}"


def test_every_public_exception_of_obelisk_is_an_obelisk_error() -> None:
    """Imports every module of the project and checks each exception class it defines."""
    import importlib
    import inspect
    import pkgutil
    from pathlib import Path

    not_rooted = []
    for pkg in ("obelisk", "builder", "update_engine", "bootloader", "cloudconfig", "update_server",
                "fleetlock_server", "provision"):
        root = importlib.import_module(pkg)
        here = [str(Path(__file__).resolve().parents[2] / pkg)]  # the package's own folder, not a tests/ namesake
        # Alembic's migration scripts run only inside alembic's context: not importable on their own.
        mods = [root] + [importlib.import_module(m.name) for m in pkgutil.walk_packages(here, f"{pkg}.")
                         if ".migrations" not in m.name]
        for mod in mods:
            for name, obj in vars(mod).items():
                if (inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == mod.__name__
                        and not name.startswith("_") and not issubclass(obj, ObeliskError)):
                    not_rooted.append(f"{mod.__name__}.{name}")
    assert not not_rooted, f"exceptions outside the ObeliskError root: {not_rooted}"
