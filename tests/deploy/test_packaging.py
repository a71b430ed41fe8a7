"""The wheel carries the generated modules, the .proto files and the migrations."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
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
    assert "horde_services/core/migrations/env.py" in names
    assert "horde_services/core/migrations/versions/0001_initial_schema.py" in names
    # Two top-level packages, both Horde's own: no generic name (such as `services`) that could
    # shadow, or be shadowed by, an integrator's package of the same name.
    top_level = {n.split("/")[0] for n in names if "/" in n and ".dist-info" not in n}
    assert top_level == {"horde", "horde_services"}, top_level
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "horde = horde_services.cli.entry:main"
        in zipfile.ZipFile(wheel).read(entry_points).decode()
    )


def _floor(requirement_prefix: str) -> tuple[int, ...]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if d.startswith(requirement_prefix + ">=")]
    return tuple(int(x) for x in spec.split(">=")[1].split(",")[0].split("."))


def test_declared_floors_cover_what_the_generated_code_needs() -> None:
    """An integrator installing the lowest grpcio/protobuf the package allows must be able to
    import the generated modules (they refuse older runtimes at import)."""
    v1 = ROOT / "protos" / "horde" / "v1"
    grpc_versions = {
        m.group(1)
        for path in v1.glob("*_pb2_grpc.py")
        if (m := re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", path.read_text()))
    }
    proto_versions = {
        m.groups()
        for path in v1.glob("*_pb2.py")
        if (
            m := re.search(
                r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),",
                path.read_text(),
            )
        )
    }
    assert grpc_versions and proto_versions
    need_grpc = max(tuple(int(x) for x in v.split(".")) for v in grpc_versions)
    need_proto = max(tuple(int(x) for x in v) for v in proto_versions)
    assert _floor("grpcio") >= need_grpc
    assert _floor("protobuf") >= need_proto


def test_the_client_helpers_do_not_import_the_servers() -> None:
    """A client's imports (channel, streaming client, receipts) leave the settings, metrics,
    database, Docker code and logging setup alone: lighter, and nothing registered in the
    importer's process."""
    code = (
        "import sys\n"
        "import horde_services.core.channel, horde_services.streaming_gateway.client\n"
        "import horde_services.core.receipts\n"
        "heavy = ['pydantic', 'prometheus_client', 'sqlalchemy', 'aiodocker', 'bittensor',\n"
        "         'structlog', 'rich',\n"
        "         'horde_services.core.server', 'horde_services.core.config']\n"
        "loaded = [m for m in heavy if m in sys.modules]\n"
        "assert loaded == [], loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
