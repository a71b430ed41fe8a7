"""The hardware probe: a fake NVML for the GPU path, the real library for the no-GPU path."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from horde_services.executor.hardware import (
    Gpu,
    Hardware,
    executor_class,
    gpu_model,
    probe,
    probe_gpus,
)


class FakeNVMLError(Exception):
    pass


class FakeLibraryNotFound(FakeNVMLError):
    pass


def fake_nvml(gpus: list[tuple[str, int, str]], *, init_error: Exception | None = None) -> Any:
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_error is not None:
            raise init_error

    return SimpleNamespace(
        NVMLError=FakeNVMLError,
        calls=calls,
        nvmlInit=init,
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlSystemGetDriverVersion=lambda: b"550.54.15",
        nvmlSystemGetCudaDriverVersion=lambda: 12040,
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: gpus[h][0],
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=gpus[h][1], free=0, used=0),
        nvmlDeviceGetUUID=lambda h: gpus[h][2],
    )


def test_gpu_path_through_a_fake_nvml(tmp_path: Path) -> None:
    nvml = fake_nvml(
        [
            ("NVIDIA H100 80GB HBM3", 80 * 2**30, "GPU-aaa"),
            ("NVIDIA H100 80GB HBM3", 80 * 2**30, "GPU-bbb"),
        ]
    )
    hw = probe(tmp_path / "work", nvml)
    assert hw.gpus == [
        Gpu("NVIDIA H100 80GB HBM3", 80 * 2**30, "GPU-aaa"),
        Gpu("NVIDIA H100 80GB HBM3", 80 * 2**30, "GPU-bbb"),
    ]
    assert (hw.driver_version, hw.cuda_version) == ("550.54.15", "12.4")
    assert nvml.calls == ["init", "shutdown"]
    assert executor_class(hw) == "gpu-h100x2"
    assert executor_class(hw, "my-class") == "my-class"
    proto = hw.to_proto()
    assert [g.uuid for g in proto.gpus] == ["GPU-aaa", "GPU-bbb"]
    assert proto.cuda_version == "12.4" and proto.gpus[0].memory_bytes == 80 * 2**30
    assert proto.cpu_count >= 1 and proto.memory_bytes > 0 and proto.disk_free_bytes > 0


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA GeForce RTX 4090", "rtx-4090"),
        ("Tesla T4", "t4"),
        ("NVIDIA L40S", "l40s"),
    ],
)
def test_gpu_model_slugs(name: str, model: str) -> None:
    assert gpu_model(name) == model
    assert executor_class(Hardware(gpus=[Gpu(name, 1, "u")])) == f"gpu-{model}"


def test_library_not_found_means_a_cpu_class(tmp_path: Path) -> None:
    nvml = fake_nvml([], init_error=FakeLibraryNotFound("NVML Shared Library Not Found"))
    assert probe_gpus(nvml) == ([], "", "")
    hw = probe(tmp_path, nvml)
    assert executor_class(hw) in ("cpu-small", "cpu-large")
    assert executor_class(Hardware(cpu_count=4)) == "cpu-small"
    assert executor_class(Hardware(cpu_count=32)) == "cpu-large"


def test_driver_failing_mid_probe_is_no_gpu() -> None:
    nvml = fake_nvml([("NVIDIA H100", 1, "u")])

    def broken() -> int:
        raise FakeNVMLError("GPU is lost")

    nvml.nvmlDeviceGetCount = broken
    assert probe_gpus(nvml) == ([], "", "")
    assert nvml.calls == ["init", "shutdown"]


def test_real_nvml_on_this_host(tmp_path: Path) -> None:
    """The real nvidia-ml-py: without a driver it raises NVMLError_LibraryNotFound at init and
    the probe reports a CPU class; on a GPU host it reports the GPUs."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        has_gpu = False
    except pynvml.NVMLError:
        has_gpu = False
    else:
        has_gpu = int(pynvml.nvmlDeviceGetCount()) > 0
        pynvml.nvmlShutdown()
    hw = probe(tmp_path)
    if has_gpu:
        assert hw.gpus and hw.driver_version and executor_class(hw).startswith("gpu-")
    else:
        assert hw.gpus == [] and hw.driver_version == "" and hw.cuda_version == ""
        assert executor_class(hw).startswith("cpu-")
