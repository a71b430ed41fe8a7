"""The streaming benchmark's arithmetic: ratios, the CPU split by process, merged runs."""

from __future__ import annotations

from benchmarks.streaming import Measure, report


def _measured(requests: int, wall_s: float, latency_s: float, cpu: dict[str, float]) -> Measure:
    m = Measure(requests, wall_s, [latency_s] * requests)
    before = {"machine": 10.0, **{role: 1.0 for role in cpu if role != "machine"}}
    after = {role: before[role] + used for role, used in cpu.items()}
    m.took_cpu(before, after)
    return m


def test_cpu_split_names_what_no_process_used_rest() -> None:
    m = _measured(100, 1.0, 0.01, {"machine": 0.2, "client": 0.05, "gateway": 0.08})
    assert round(m.cpu_s, 9) == 0.2
    assert m.cpu_us_per_request_by_process() == {"client": 500.0, "gateway": 800.0, "rest": 700.0}


def test_merge_adds_runs_up_per_process() -> None:
    a = _measured(10, 1.0, 0.1, {"machine": 0.1, "client": 0.02})
    b = _measured(30, 2.0, 0.1, {"machine": 0.3, "client": 0.04})
    m = Measure.merge([a, b])
    assert (m.requests, m.wall_s, len(m.latencies_s)) == (40, 3.0, 40)
    assert m.cpu_us_per_request_by_process() == {"client": 1500.0, "rest": 8500.0}


def test_report_figures_and_summary() -> None:
    def paths(direct_rps: float, horde_rps: float) -> dict[str, Measure]:
        return {
            "direct": _measured(100, 100 / direct_rps, 0.001, {"machine": 0.07, "client": 0.02}),
            "horde": _measured(
                100, 100 / horde_rps, 0.0015, {"machine": 0.17, "client": 0.03, "gateway": 0.05}
            ),
        }

    result = report("real", "same container", 2, {1: paths(1000, 500), 16: paths(2000, 1300)})
    f = result.figures
    assert f["throughput_ratio_1"] == 0.5
    assert f["throughput_ratio_16"] == 0.65
    assert f["added_p50_ms"] == 0.5
    assert f["horde_cpu_us_per_request_16_by_process"] == {
        "client": 300.0,
        "gateway": 500.0,
        "rest": 900.0,
    }
    assert result.passed is False  # 0.5 at one session misses the 0.6 target
    assert "CPU per request with 16 sessions, by process (us): direct client 200, rest 500; " in (
        result.summary
    )
