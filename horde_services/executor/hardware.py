"""Hardware probe: GPUs through NVML (nvidia-ml-py), CPU, memory and disk from the OS.

Without a GPU driver NVML raises NVMLError_LibraryNotFound (or DriverNotLoaded) at nvmlInit():
the executor then reports a CPU-only class. The NVML module is a parameter so the GPU path can be
tested with a fake here.
"""

from __future__ import annotations

import importlib
import os
import platform
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import structlog
from horde.v1 import manifest_pb2

log = structlog.get_logger("horde.executor.hardware")


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    uuid: str


@dataclass(frozen=True)
class Hardware:
    gpus: list[Gpu] = field(default_factory=list)
    driver_version: str = ""
    cuda_version: str = ""
    cpu_model: str = ""
    cpu_count: int = 0
    memory_bytes: int = 0
    disk_free_bytes: int = 0

    def to_proto(self) -> manifest_pb2.HardwareInfo:
        return manifest_pb2.HardwareInfo(
            gpus=[
                manifest_pb2.GpuInfo(name=g.name, memory_bytes=g.memory_bytes, uuid=g.uuid)
                for g in self.gpus
            ],
            driver_version=self.driver_version,
            cuda_version=self.cuda_version,
            cpu_model=self.cpu_model,
            cpu_count=self.cpu_count,
            memory_bytes=self.memory_bytes,
            disk_free_bytes=self.disk_free_bytes,
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def probe_gpus(nvml: ModuleType | Any | None = None) -> tuple[list[Gpu], str, str]:
    """GPUs, driver version and CUDA version; empty when NVML is unavailable.

    No driver (``NVMLError_LibraryNotFound``, ``DriverNotLoaded``), no nvidia-ml-py, or a driver
    that fails mid-query all mean a CPU-only host: the executor must still come up.
    """
    if nvml is None:
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError as exc:
            log.info("no_gpu", reason=f"nvidia-ml-py not installed: {exc}")
            return [], "", ""
    assert nvml is not None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        log.info("no_gpu", reason=str(exc))
        return [], "", ""
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        cuda_raw = int(nvml.nvmlSystemGetCudaDriverVersion())
        cuda = f"{cuda_raw // 1000}.{(cuda_raw % 1000) // 10}"
        gpus = []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                Gpu(
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    memory_bytes=int(memory.total),
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                )
            )
        return gpus, driver, cuda
    except nvml.NVMLError as exc:
        log.warning("gpu_probe_failed", reason=str(exc))
        return [], "", ""
    finally:
        nvml.nvmlShutdown()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def probe(work_dir: Path, nvml: ModuleType | Any | None = None) -> Hardware:
    gpus, driver, cuda = probe_gpus(nvml)
    work_dir.mkdir(parents=True, exist_ok=True)
    return Hardware(
        gpus=gpus,
        driver_version=driver,
        cuda_version=cuda,
        cpu_model=_cpu_model(),
        cpu_count=os.cpu_count() or 1,
        memory_bytes=_memory_bytes(),
        disk_free_bytes=shutil.disk_usage(work_dir).free,
    )


_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro"}


def gpu_model(name: str) -> str:
    """A short model slug from an NVML name: "NVIDIA H100 80GB HBM3" -> "h100",
    "NVIDIA GeForce RTX 4090" -> "rtx-4090", "NVIDIA A100-SXM4-80GB" -> "a100"."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in _VENDOR_WORDS]
    if not words:
        return "unknown"
    if not any(ch.isdigit() for ch in words[0]) and len(words) > 1:
        return f"{words[0]}-{words[1]}"
    return words[0]


def executor_class(hw: Hardware, configured: str = "") -> str:
    """The class from config when given, else derived: gpu-<model> (gpu-<model>x<N> for N GPUs)
    from the first GPU, or cpu-small/cpu-large by core count."""
    if configured:
        return configured
    if hw.gpus:
        model = gpu_model(hw.gpus[0].name)
        return f"gpu-{model}" if len(hw.gpus) == 1 else f"gpu-{model}x{len(hw.gpus)}"
    return "cpu-large" if hw.cpu_count >= 16 else "cpu-small"
