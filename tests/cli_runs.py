"""The command line as the tests run it: in a subprocess (as a user would, optionally under the CUDA output-layout
emulation of sdpa_layouts.py), or in-process for a refused call's one error line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from goldens import TINY_MODEL

from nextstep_runtime.cli.main import main

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def run_cli(*args: str, sdpa_layout: str = "cpu", path: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    """`generate` in a subprocess; with sdpa_layout "cuda", under the CUDA output-layout emulation; `path`: folders
    put first on its import path (a broken package, say)."""
    module = "sdpa_layouts" if sdpa_layout == "cuda" else "nextstep_runtime"
    python_path = [*map(str, path), str(TESTS), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, python_path))}
    return subprocess.run([sys.executable, "-m", module, "generate", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def command_error(capsys, *argv: str) -> str:
    """Run any CLI command in-process; assert exit code 2 and one error line that is not a bug report (the
    contract for every user mistake); return that line."""
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "please report" not in err and "Traceback" not in err, err
    return lines[0]


def folder_error(capsys, tmp_path: Path, command: str, folder: Path) -> str:
    """The one error line of `command` (generate, plan or convert) run on the model folder `folder`."""
    if command == "generate":
        return cli_error(capsys, tmp_path, "--prompt", "x", model=folder)
    if command == "plan":
        return command_error(capsys, "plan", str(folder))
    return command_error(capsys, "convert", str(folder), str(tmp_path / "converted"), "--weights", "int4")


def cli_error(capsys, tmp_path: Path, *args: str, model: Path = TINY_MODEL) -> str:
    """Run `generate` in-process; assert exit code 2, one error line, no output file; return the message."""
    out = tmp_path / "out.png"
    line = command_error(capsys, "generate", "--model", str(model), "--device", "cpu", "--dtype", "float32",
                         "--width", "32", "--height", "32", "--steps", "2", "--out", str(out), *args)
    assert not out.exists()
    return line
