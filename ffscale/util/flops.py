"""Model FLOPs per image (counted by torch's FlopCounterMode on meta tensors) and device peaks."""

from __future__ import annotations

import functools
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense peak FLOP/s by device name fragment and dtype (vendor datasheets, no sparsity).
GPU_PEAKS = {  # first match wins: the specific names before "H100"
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12},
}


def train_flops_per_image(build, img_size: int, in_chans: int = 3) -> float:
    """Forward FLOPs x 3 (backward ~ 2x forward), from a forward on the meta device."""
    with torch.device("meta"):
        model = build()
        x = torch.empty(1, in_chans, img_size, img_size)
    with FlopCounterMode(display=False) as fc:
        model(x)
    return 3.0 * fc.get_total_flops()


def gpu_peak(device: torch.device, precision: str) -> float:
    name = torch.cuda.get_device_name(device)
    for key, peaks in GPU_PEAKS.items():
        if key in name:
            return peaks[precision]
    return 0.0


def cpu_matmul_peak(n: int = 1024, seconds: float = 0.5, dtype=torch.float32, windows: int = 5) -> float:
    """Measured dense matmul FLOP/s with the current thread count. The best of several short
    windows, so a moment of interference (a shared host) is not read as the peak. The size is the
    largest (up to n) whose product fits a window: a CPU without bf16 units emulates a 1024^2 bf16
    product in seconds, and every stage's start waited for six of them."""
    window = seconds / windows
    a, b = torch.randn(256, 256, dtype=dtype), torch.randn(256, 256, dtype=dtype)
    a @ b  # the first product pays for the set-up
    small = min(_timed(a, b) for _ in range(3))  # the least disturbed of three
    while n > 256 and small * (n / 256) ** 3 > window:
        n //= 2
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(windows):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < window:
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def _timed(a: torch.Tensor, b: torch.Tensor) -> float:
    t0 = time.perf_counter()
    a @ b
    return time.perf_counter() - t0


@functools.cache  # once per process: a pipeline's stages run on the same host
def cpu_host_peak(precision: str = "fp32") -> float:
    """The CPU 'peak' for MFU: the host's matmul rate, every core this process may use on one
    product; callers share it among the host's ranks and keep the others idle meanwhile. (One-core
    probes run by every rank at once read low, the cores sharing cache and clock: MFU over 100%.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    try:
        fp32 = cpu_matmul_peak()
        if precision == "fp32":
            return fp32
        # CPUs without bf16 units emulate it slower than fp32; the peak is the faster of the two
        return max(fp32, cpu_matmul_peak(dtype=torch.bfloat16 if precision == "bf16" else torch.float16))
    finally:
        torch.set_num_threads(threads)


def device_peak(device: torch.device, precision: str, local_world: int = 1) -> float:
    """Peak FLOP/s of one rank's device: a GPU's datasheet figure, or its share of the CPU host."""
    if device.type == "cuda":
        return gpu_peak(device, precision)
    return cpu_host_peak(precision) / max(1, local_world)


def rank_peak(dist, precision: str) -> float:
    """`device_peak` on every rank of a job: each host's first rank measures while the others wait
    (a CPU host's probe must not share the cores with training), then every rank has the figure."""
    if dist.world == 1:
        return device_peak(dist.device, precision)
    torch.distributed.barrier()  # no rank still stepping
    peak = torch.zeros(1, device=dist.device)
    if dist.local_rank == 0:
        peak += device_peak(dist.device, precision, dist.local_world)
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)  # the others wait here
    return float(peak)
