"""What every report records: library versions, timings, peak memory."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import threading
import time
from collections.abc import Iterator

import psutil
import torch
from pydantic import BaseModel

LIBRARIES = ("antidote-llm", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "vllm")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


class Timings(dict):
    """Named wall times in seconds: `with timings.measure("load_s"): ...`."""

    @contextlib.contextmanager
    def measure(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = round(self.get(name, 0.0) + time.perf_counter() - start, 4)


class MemoryReport(BaseModel):
    rss_start_bytes: int
    peak_rss_bytes: int
    peak_gpu_bytes: int | None


class MemoryMonitor:
    """Peak resident memory of this process (sampled in a thread) and peak CUDA memory over a block."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self._process = psutil.Process()
        self.start_rss = 0
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)

    def __enter__(self) -> MemoryMonitor:
        self.start_rss = self.peak_rss = self._process.memory_info().rss
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)

    def report(self) -> MemoryReport:
        gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        return MemoryReport(rss_start_bytes=self.start_rss, peak_rss_bytes=self.peak_rss, peak_gpu_bytes=gpu)


class RunRecord(BaseModel):
    """The fields a to-disk command fills into its report: the model it read, what it wrote, how the run went."""

    model: dict | None = None
    outputs: dict | None = None
    memory: MemoryReport | None = None
    versions: dict[str, str] | None = None
    started_at: str | None = None
