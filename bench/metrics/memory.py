"""Memory over a block of work: :class:`PeakWindow` (CUDA's allocator peak; on Linux CPUs torch's
allocator peak or the process's peak RSS) and :func:`deployed_memory` (a model's resident
tensors plus the working memory of its use)."""

from __future__ import annotations

import gc
import os
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

import qdiff
from bench.errors import AvailabilityError
from qdiff.storage import exact_heap, release_free_heap

MIB = 2**20


def _rss_peak_reset() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ≥ 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakWindow:
    """Memory over a ``with`` block. After it:

    * ``working_mib``: how much the block added at its peak over what was resident when it
      started: allocated CUDA memory on a GPU (``max_memory_allocated`` − allocated before);
      on Linux CPUs the process's peak RSS (its mark reset, the C heap's free pages handed
      back first) minus its RSS before; None where the peak cannot be reset.
    * ``peak_mib``: the device's or process's whole peak (everything resident included).
    * ``memory``: how it was measured.

    With ``exact`` (deployed memory), a CPU window runs inside :func:`qdiff.storage.exact_heap`:
    glibc maps every large allocation on its own, so the resident peak is what the block
    allocated, not what the heap's fragmentation left behind. Without it the figure is an upper
    bound that moves between calls by tens of MiB; with it, the code inside runs slower and is
    never timed.

    With ``allocator`` (deployed memory of a model that allocates through torch), a CPU
    window's ``working_mib`` is instead the peak of what torch's CPU allocator handed out over
    the block, traced by the profiler's memory events: the CPU twin of CUDA's
    ``max_memory_allocated``. Even the exact RSS window moved by ±15 MiB between calls of the
    same embedded-UNet step (resident library pages, oneDNN's scratch, heap arenas), as much as
    an int8 deployment saves there; the allocator's peak repeats to the byte and counts every
    tensor the step holds, inductor's buffers and oneDNN's scratch included. The RSS reading
    of the same block stays in the row (``rss_working_mib``). A model running in another
    runtime's memory (OpenVINO) is measured by RSS only.
    """

    def __init__(self, device: torch.device, exact: bool = False, allocator: bool = False) -> None:
        self.device, self.exact = device, exact
        self.allocator = allocator and device.type == "cpu"
        self._heap = self._trace = None

    def __enter__(self) -> PeakWindow:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            self.source = "torch.cuda.max_memory_allocated"
        elif sys.platform == "linux" and release_free_heap() and _rss_peak_reset():
            exact = False
            if self.exact:
                self._heap = exact_heap()
                exact = self._heap.__enter__()
                release_free_heap()
                _rss_peak_reset()
            self.before = _rss_kib("VmRSS") * 1024
            self.source = "peak RSS of the process (VmHWM, reset and free heap released before" + (
                ", every allocation from 64 KiB mapped on its own)" if exact else ")"
            )
            if self.allocator:
                self._trace = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
                )
                with _quiet_stderr():
                    self._trace.__enter__()
        else:  # cannot reset: the process's lifetime peak, an upper bound
            self.before = None
            self.source = "peak RSS of the process since it started (ru_maxrss)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.before is not None:
            if self._trace is not None:
                with _quiet_stderr():
                    self._trace.__exit__(None, None, None)
            peak = _rss_kib("VmHWM") * 1024
            if self._heap is not None:
                self._heap.__exit__(None, None, None)
        else:
            usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = usage * (1 if sys.platform == "darwin" else 1024)
        self.peak_mib = peak / MIB
        self.working_mib = None if self.before is None else max(peak - self.before, 0) / MIB
        before = None if self.before is None else self.before / MIB
        self.memory = {"memory_source": self.source, "before_mib": before, "process_peak_mib": self.peak_mib}
        if self._trace is not None:
            self.memory["rss_working_mib"] = self.working_mib
            self.working_mib = _allocated_peak(self._trace) / MIB
            self.source = self.memory["memory_source"] = (
                "torch's CPU allocator: peak of what the block allocated (profiler memory events)"
            )


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The process's stderr (file descriptor 2) closed for the block: the profiler's C++ side
    (kineto) prints start/stop and no-GPU lines there at every trace, which no setting mutes."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _allocated_peak(trace: torch.profiler.profile) -> int:
    """Bytes: the highest point the CPU allocations traced by ``trace`` reached over what was
    allocated when it started (frees of older tensors count, so this is the rise, not a sum)."""
    events = [
        e for e in trace.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]  # fmt: skip
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def deployed_memory(model: nn.Module, window: PeakWindow) -> tuple[float, dict]:
    """What running ``model`` costs (MiB): its tensors as resident
    (:func:`qdiff.resident_bytes`) plus the working memory the window measured around its use,
    with nothing else resident counted (the FP model, calibration data, quantizers' float
    copies in other models, the interpreter and libraries). The row's extras give both parts.

    Raises:
        AvailabilityError: the platform cannot reset its peak (not Linux, or no glibc).
    """
    if window.working_mib is None:
        raise AvailabilityError(
            "deployed memory needs a resettable peak (a CUDA device, or Linux with glibc); "
            f"here only the process's lifetime peak is known ({window.peak_mib:.0f} MiB)"
        )
    weights = qdiff.resident_bytes(model) / MIB
    parts = {"weights_resident_mib": weights, "working_mib": window.working_mib, **window.memory}
    return weights + window.working_mib, parts
