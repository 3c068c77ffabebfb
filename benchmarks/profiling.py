"""GPU kernel times from ``torch.profiler``, shared by the benchmarks that profile (``generate.py``,
``check_compile_gpu.py``)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def kernel_times(run: Callable[[], None]) -> dict[str, list[float]]:
    """Microseconds of every CUDA kernel ``run()`` launched, by kernel name (synchronized before
    the profile ends)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times.setdefault(e.name, []).append(e.device_time_total)
    return times


def top_kernels(times: dict[str, list[float]], calls: int, top: int) -> list[tuple[float, float, str]]:
    """The ``top`` kernels by time: (microseconds per call, launches per call, name), slowest first."""
    return sorted(((sum(v) / calls, len(v) / calls, n) for n, v in times.items()), reverse=True)[:top]
