"""Measuring memory: the machine's RAM, a process's RSS and, through NVML, the GPUs' and a
process's VRAM (reported only where nvidia-ml-py and a driver are present); and heap trimming.

Concurrency: NVML is initialised once, under a lock, by whichever thread asks first.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import psutil

log = logging.getLogger(__name__)


class MemoryProbe:
    """Reads a process's resident memory and, where NVML is available, its GPU memory."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._nvml_lock = threading.Lock()
        self._nvml_tried = False

    def rss(self, pid: int | None = None) -> int:
        """Resident set size in bytes of ``pid`` (default: this process); 0 when it is gone."""
        try:
            return psutil.Process(pid).memory_info().rss
        except psutil.Error:
            return 0

    def machine(self) -> dict[str, int]:
        """The machine's RAM in bytes: ``total``, ``available`` (without evicting anything) and
        ``used`` (the rest: what processes hold, not the page cache)."""
        memory = psutil.virtual_memory()
        return {"total_bytes": memory.total, "available_bytes": memory.available,
                "used_bytes": memory.total - memory.available}

    def gpus(self) -> list[dict[str, Any]]:
        """Each GPU's memory (``index``, ``name``, ``total_bytes``, ``used_bytes``); empty
        without NVML or a GPU."""
        nvml = self._load_nvml()
        if nvml is None:
            return []
        found = []
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                device = nvml.nvmlDeviceGetHandleByIndex(index)
                name = nvml.nvmlDeviceGetName(device)
                info = nvml.nvmlDeviceGetMemoryInfo(device)
                found.append({"index": index, "name": name.decode() if isinstance(name, bytes) else str(name),
                              "total_bytes": int(info.total), "used_bytes": int(info.used)})
        except nvml.NVMLError as exc:
            log.debug("NVML query failed: %s", exc)
            return []
        return found

    def vram(self, pid: int | None = None) -> int | None:
        """GPU memory used by ``pid`` (default: this process) in bytes, or None without NVML
        (nvidia-ml-py) or a GPU."""
        nvml = self._load_nvml()
        if nvml is None:
            return None
        pid, total = pid or os.getpid(), 0
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
