"""The console scripts of pyproject.toml: each target imports, takes ``argv``, and ``--help`` exits 0.

The scripts are tested through their targets (the same ``main`` the installed wrapper calls as
``sys.exit(main())``), so the test does not need the package reinstalled.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parent.parent
SCRIPTS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_the_commands_a_user_types_are_installed() -> None:
    assert set(SCRIPTS) == {"stmi-train", "stmi-sweep", "stmi-report", "stmi-data", "stmi-stack"}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_help_exits_0(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    module, _, attr = SCRIPTS[name].partition(":")
    main = getattr(importlib.import_module(module), attr)
    assert "argv" in inspect.signature(main).parameters, f"{SCRIPTS[name]} must take argv (tests call it in-process)"
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and len(out.splitlines()) > 3, out


def test_data_script_returns_an_exit_code_and_errors_go_to_stderr(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    module, _, attr = SCRIPTS["stmi-data"].partition(":")
    main = getattr(importlib.import_module(module), attr)
    assert main(["check", "--dataset", "msvr310", "--root", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "1 error(s)" in captured.out
    assert captured.err.startswith("error: ") and "MSVR310" in captured.err and "docs/datasets.md" in captured.err
