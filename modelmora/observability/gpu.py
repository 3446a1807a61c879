"""GPU utilisation and memory per device, read from NVML (the NVIDIA driver's management library)
through ctypes: no Python package needed, nothing read where no NVIDIA driver is installed.

NVML is not CUDA: reading it never creates a CUDA context in the supervisor. Devices are
numbered as NVML numbers them (PCI bus order), which is CUDA's order when
`CUDA_DEVICE_ORDER=PCI_BUS_ID`.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

__all__ = ("GpuSample", "Nvml")


@dataclass(frozen=True, slots=True)
class GpuSample:
    index: int
    utilization_ratio: float
    """Share of the last sample period during which a kernel ran (0..1)."""
    memory_used_bytes: int
    memory_total_bytes: int


class _Utilization(ctypes.Structure):
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class Nvml:
    """The NVML library, opened on first use; `samples()` is empty where there is none or no GPU."""

    def __init__(self, library: str = "libnvidia-ml.so.1") -> None:
        self._library = library
        self._lib: ctypes.CDLL | None = None
        self._unavailable = False

    def _open(self) -> ctypes.CDLL | None:
        if self._lib is None and not self._unavailable:
            try:
                lib = ctypes.CDLL(self._library)
                if lib.nvmlInit_v2() != 0:
                    raise OSError("nvmlInit failed")
            except (OSError, AttributeError):
                self._unavailable = True  # no driver (or no GPU): never tried again
                return None
            self._lib = lib
        return self._lib

    def samples(self) -> list[GpuSample]:
        """Every GPU's utilisation and memory now (empty without NVML; a device that fails a call is left out)."""
        lib = self._open()
        if lib is None:
            return []
        count = ctypes.c_uint(0)
        if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return []
        out = []
        for i in range(count.value):
            handle = ctypes.c_void_p()
            util, mem = _Utilization(), _Memory()
            if (
                lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(i), ctypes.byref(handle)) != 0
                or lib.nvmlDeviceGetUtilizationRates(handle, ctypes.byref(util)) != 0
                or lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) != 0
            ):
                continue
            out.append(GpuSample(i, util.gpu / 100.0, int(mem.used), int(mem.total)))
        return out
