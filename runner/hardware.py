"""GPU facts through NVML, in the shapes of /hardware/info and /hardware/stats.

A machine without an NVIDIA driver has no GPUs to report: both maps are empty.
"""

from __future__ import annotations

import os

import structlog

from runner.schema import GPUComputeInfo, GPUUtilizationInfo

log = structlog.get_logger(__name__)

try:
    import pynvml
except ImportError:  # nvidia-ml-py is a dependency; tolerate a trimmed install
    pynvml = None


class NVML:
    def __init__(self) -> None:
        self.available = False
        if pynvml is None:
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            log.debug("hardware.nvml.unavailable", reason=str(exc))
            return
        self.available = True

    def close(self) -> None:
        if self.available:
            pynvml.nvmlShutdown()
            self.available = False

    def device_count(self) -> int:
        """GPUs this process may use: NVML's count, narrowed by CUDA_VISIBLE_DEVICES."""
        if not self.available:
            return 0
        count = pynvml.nvmlDeviceGetCount()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            count = min(count, len([device for device in visible.split(",") if device.strip()]))
        return count

    def _handles(self):
        if not self.available:
            return
        for index in range(pynvml.nvmlDeviceGetCount()):
            yield str(index), pynvml.nvmlDeviceGetHandleByIndex(index)

    def compute_info(self) -> dict[str, GPUComputeInfo]:
        info = {}
        for index, handle in self._handles():
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            info[index] = GPUComputeInfo(
                id=_text(pynvml.nvmlDeviceGetUUID(handle)),
                name=_text(pynvml.nvmlDeviceGetName(handle)),
                memory_total=memory.total,
                memory_free=memory.free,
                major=major,
                minor=minor,
            )
        return info

    def utilization_info(self) -> dict[str, GPUUtilizationInfo]:
        stats = {}
        for index, handle in self._handles():
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            utilization = pynvml.nvmlDeviceGetUtilizationRates(handle)
            stats[index] = GPUUtilizationInfo(
                id=_text(pynvml.nvmlDeviceGetUUID(handle)),
                name=_text(pynvml.nvmlDeviceGetName(handle)),
                memory_total=memory.total,
                memory_free=memory.free,
                utilization_compute=utilization.gpu,
                utilization_memory=utilization.memory,
            )
        return stats


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
