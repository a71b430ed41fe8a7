"""Demo job: hash every input file under /volume and write a summary to /output."""

import hashlib
import json
import os
import sys
from pathlib import Path

VOLUME = Path(os.environ.get("HORDE_VOLUME", "/volume"))
OUTPUT = Path(os.environ.get("HORDE_OUTPUT", "/output"))


def main() -> int:
    files = []
    texts = []
    if VOLUME.is_dir():
        for path in sorted(p for p in VOLUME.rglob("*") if p.is_file()):
            data = path.read_bytes()
            files.append(
                {
                    "name": path.relative_to(VOLUME).as_posix(),
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
            texts.append(data.decode("utf-8", errors="replace"))
    OUTPUT.mkdir(parents=True, exist_ok=True)
    (OUTPUT / "summary.json").write_text(
        json.dumps({"files": files, "total_bytes": sum(f["size"] for f in files)}, indent=2) + "\n"
    )
    (OUTPUT / "upper.txt").write_text("".join(texts).upper())
    print(f"demo-job: summarised {len(files)} file(s), {sum(f['size'] for f in files)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
