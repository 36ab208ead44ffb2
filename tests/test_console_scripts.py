"""The console scripts setup.cfg declares resolve and answer --help outside the checkout."""

import configparser
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"rawtune-cls", "rawtune-lora", "rawtune-compare", "rawtune-plot"}

# Run as an installed console script runs: the entry point loaded and called with no
# arguments, sys.argv naming the script. --help ends in SystemExit(0).
RUN_HELP = """
import sys
from importlib.metadata import EntryPoint
for name, value in {scripts!r}.items():
    sys.argv = [name, "--help"]
    try:
        code = EntryPoint(name, value, "console_scripts").load()()
    except SystemExit as stop:
        code = stop.code
    print("exit", name, code)
"""


def declared() -> dict[str, str]:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    lines = setup["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(line.replace(" ", "").split("=") for line in lines)


def test_every_script_is_declared():
    assert set(declared()) == SCRIPTS


def test_scripts_answer_help_from_another_directory(tmp_path):
    scripts = declared()
    done = subprocess.run([sys.executable, "-c", RUN_HELP.format(scripts=scripts)], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in scripts:
        assert f"exit {name} 0" in done.stdout
        assert f"usage: {name}" in done.stdout  # argparse names the script as installed
    assert "--keep-best" in done.stdout and "--metric" in done.stdout


def test_the_installed_metadata_lists_them():
    """Holds once rawtune is installed (pip install -e . or a wheel) from this setup.cfg."""
    try:
        installed = importlib.metadata.distribution("rawtune").entry_points
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("rawtune is not installed")
    scripts = {ep.name: ep.value for ep in installed.select(group="console_scripts")}
    if not scripts:
        pytest.skip("the installed rawtune predates its console scripts: pip install -e . again")
    assert scripts == declared()
