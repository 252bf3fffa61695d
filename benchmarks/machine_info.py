"""What the benchmarks (`bench.py`, `bench_sweep.py`) record about the machine, and its matmul peak (moved
out of the library's `vitrepro/machine.py`, which keeps what the trainer needs)."""
from __future__ import annotations

from __future__ import annotations
import math
import os
import platform
import time

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------- benchmarks
# What the benchmarks (vitrepro/bench.py, vitrepro/bench_sweep.py) record about the machine, and its matmul peak.

CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile",
                         "amx_bf16", "amx_int8", "avx_vnni")



def _cpuinfo() -> tuple[str | None, set[str]]:
    name, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if name is None and line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif not flags and line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                if name and flags:
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


def machine_info(device: torch.device) -> dict:
    import timm
    cpu_name, flags = _cpuinfo()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    info = {
        "device_kind": device.type,
        "cpu": cpu_name,
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_flags": {f: (f in flags) for f in CPU_FLAGS_OF_INTEREST} if flags else {},
        "cpu_bf16_native": bool(flags & {"avx512_bf16", "amx_bf16"}),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "hostname": platform.node(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_capability=f"{p.major}.{p.minor}",
                    gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device, min_time: float, repeats: int = 3, max_reps: int = 1000) -> float:
    """Seconds per call of `fn`: the best of `repeats` loops of enough calls to last about `min_time`."""
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    single = time.perf_counter() - t  # includes one-time setup; only used to size the loop
    reps = max(1, min(max_reps, int(min_time / max(single, 1e-6))))
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes=(128, 256, 512, 1024, 2048), min_time: float = 0.2,
                max_single: float = 1.0) -> dict:
    """Best dense (n x n) @ (n x n) rate over `sizes` and two entry points (``torch.mm`` and ``F.linear``,
    i.e. addmm with a transposed weight, which is what nn.Linear runs), in FLOP/s (2 n^3 per product).
    Larger sizes are skipped once one product takes longer than `max_single` seconds (bf16 on a CPU without
    bf16 units, where the kernels get *slower* with size)."""
    per_size, slow = {}, False
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        rates = {}
        for op, fn in (("mm", lambda: torch.mm(a, b)), ("linear", lambda: F.linear(a, b))):
            best = _best_time(fn, device, min_time, max_reps=1000)
            rates[op] = 2 * n**3 / best
            slow = slow or best > max_single
        per_size[n] = rates
        if slow:
            break
    n, op = max(((n, op) for n in per_size for op in per_size[n]), key=lambda k: per_size[k[0]][k[1]])
    return {"flops_per_s": per_size[n][op], "size": n, "op": op,
            "per_size_gflops": {f"{k}/{o}": round(v / 1e9, 2) for k, r in per_size.items() for o, v in r.items()}}
