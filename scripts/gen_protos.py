"""Generate the typed Python modules for protos/horde/v1 (protoc + mypy-protobuf).

Generated files land beside the .proto files so that `horde.v1.*_pb2` imports absolutely. With
--check, generate into a scratch folder and fail when anything committed differs.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = PROTO_ROOT / "horde" / "v1"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out: Path) -> None:
    # mypy-protobuf's protoc plugins live beside this interpreter in the virtualenv.
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PACKAGE.glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    # A subprocess, so the plugins' chatter ("Writing mypy to ...") is shown only on failure.
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"protoc failed:\n{done.stdout}{done.stderr}")
    pkg = out / "horde" / "v1"
    for init in (out / "horde" / "__init__.py", pkg / "__init__.py"):
        init.parent.mkdir(parents=True, exist_ok=True)
        init.touch()


def generated_files(pkg: Path) -> set[str]:
    return {p.name for p in pkg.iterdir() if p.name.endswith(SUFFIXES)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        fresh = out / "horde" / "v1"
        names = generated_files(fresh)
        if check:
            stale = sorted(
                n
                for n in names | generated_files(PACKAGE)
                if not (PACKAGE / n).exists()
                or not (fresh / n).exists()
                or not filecmp.cmp(PACKAGE / n, fresh / n, shallow=False)
            )
            if stale:
                print("generated code is stale, run `make protos`:", *stale, sep="\n  ")
                return 1
            print("generated code is fresh")
            return 0
        for old in generated_files(PACKAGE) - names:
            (PACKAGE / old).unlink()
        for name in names:
            shutil.copyfile(fresh / name, PACKAGE / name)
    (PROTO_ROOT / "horde" / "__init__.py").touch()
    (PACKAGE / "__init__.py").touch()
    (PROTO_ROOT / "horde" / "py.typed").touch()
    print(f"generated {len(names)} files in {PACKAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
