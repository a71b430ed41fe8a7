"""build/bench.json: each part's section is replaced by its latest figures; other parts stay."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import PartResult
from benchmarks.run import merge


def test_a_part_replaces_its_own_section_and_keeps_the_others(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    merge(out, [PartResult("streaming", {"old_figure": 1.0, "throughput_ratio_1": 0.3})])
    merge(out, [PartResult("organic", {"ratio": 1.2})])
    merge(out, [PartResult("streaming", {"throughput_ratio_1": 0.45})])
    doc = json.loads(out.read_text())
    assert doc == {"organic": {"ratio": 1.2}, "streaming": {"throughput_ratio_1": 0.45}}


def test_an_unreadable_file_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    out.write_text("{not json")
    merge(out, [PartResult("synthetic", {"p99": 31.2})])
    assert json.loads(out.read_text()) == {"synthetic": {"p99": 31.2}}
