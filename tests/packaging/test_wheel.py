"""The wheel built from the repository carries everything dslab reads at run time."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_wheel_contains_every_package_file(tmp_path: Path) -> None:
    """Every file under dslab/ (code, web pages, templates, data) is in the wheel,
    and the console script is declared."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=170,
    )
    [wheel] = tmp_path.glob("dslab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    expected = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "dslab").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert expected, "found no package files at all"
    assert expected - names == set()
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "dslab = dslab.cli.app:main" in zipfile.ZipFile(wheel).read(
        entry_points).decode()
