"""A real, non-editable wheel ships every module of the source tree and the `fusec` command.

An editable install imports straight from the folders, so only a built wheel shows a
package the packaging config misses (a hand-kept list once left out fusec.runtime.server).
"""
from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# each code folder and the package it is installed as
FOLDERS = {"fusec": "fusec", "fusion": "fusec.fusion", "kernels": "fusec.kernels", "models": "fusec.models",
           "runtime": "fusec.runtime", "cli": "fusec.cli"}
BUILD_INPUTS = ["pyproject.toml", "setup.py", "README.md"]


def module_name(relative: Path) -> str:
    """`runtime/server/app.py` seen from its package -> `server.app`."""
    return ".".join(relative.with_suffix("").parts)


def source_modules() -> set[str]:
    return {f"{package}.{module_name(path.relative_to(ROOT / folder))}"
            for folder, package in FOLDERS.items() for path in (ROOT / folder).rglob("*.py")}


def build_wheel(tmp_path: Path) -> Path:
    # build from a clean copy: a stale build/ in the checkout could hide a missing package
    src = tmp_path / "src"
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in BUILD_INPUTS:
        shutil.copy(ROOT / name, src / name)
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(out), str(src)], check=True)
    (wheel,) = out.glob("fusec-*.whl")
    return wheel


def test_wheel_ships_every_module_and_the_console_script(tmp_path):
    with zipfile.ZipFile(build_wheel(tmp_path)) as wheel:
        names = wheel.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = configparser.ConfigParser()
        scripts.read_string(wheel.read(entry_points).decode())
    shipped = {module_name(Path(n)) for n in names if n.endswith(".py")}
    expected = source_modules()
    assert "fusec.runtime.server.app" in expected  # the walk sees nested packages
    assert not expected - shipped, f"missing from the wheel: {sorted(expected - shipped)}"
    assert not shipped - expected, f"in the wheel but not the source tree: {sorted(shipped - expected)}"
    assert scripts["console_scripts"]["fusec"] == "fusec.cli.main:cli"
