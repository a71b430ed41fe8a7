"""The wheel carries the generated modules, the .proto files and the migrations."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_wheel_contents(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("horde-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    protos = sorted(p.name for p in (ROOT / "protos" / "horde" / "v1").glob("*.proto"))
    assert protos
    for proto in protos:
        stem = proto.removesuffix(".proto")
        for generated in (proto, f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"):
            assert f"horde/v1/{generated}" in names
    assert "horde/py.typed" in names
    assert "services/core/migrations/env.py" in names
    assert "services/core/migrations/versions/0001_initial_schema.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "horde = services.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
