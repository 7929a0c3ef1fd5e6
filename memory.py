"""Measuring and giving back memory: process RSS, this process's VRAM, and heap trimming."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from contextlib import suppress
from typing import Any

import psutil

log = logging.getLogger(__name__)


class MemoryProbe:
    """Reads this process's resident memory and, where NVML is available, its GPU memory."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._nvml: Any = None
        self._nvml_lock = threading.Lock()
        self._nvml_tried = False

    def rss(self) -> int:
        """Resident set size in bytes."""
        return self._process.memory_info().rss

    def vram(self) -> int | None:
        """GPU memory used by this process in bytes, or None without NVML (nvidia-ml-py) or a GPU."""
        nvml = self._load_nvml()
        if nvml is None:
            return None
        pid, total = os.getpid(), 0
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                device = nvml.nvmlDeviceGetHandleByIndex(index)
                for process in nvml.nvmlDeviceGetComputeRunningProcesses(device):
                    if process.pid == pid and process.usedGpuMemory:
                        total += process.usedGpuMemory
        except nvml.NVMLError as exc:
            log.debug("NVML query failed: %s", exc)
            return None
        return total

    def _load_nvml(self) -> Any:
        with self._nvml_lock:
            if not self._nvml_tried:
                self._nvml_tried = True
                try:
                    import pynvml  # optional: pip install nvidia-ml-py

                    pynvml.nvmlInit()
                    self._nvml = pynvml
                except Exception as exc:  # no package, no driver, or no GPU: VRAM is simply not reported
                    log.debug("NVML unavailable: %s", exc)
            return self._nvml


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and RSS stays up)."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return
    with suppress(OSError, AttributeError):
        ctypes.CDLL(libc_name).malloc_trim(0)
