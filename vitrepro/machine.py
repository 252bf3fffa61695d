"""What this machine is good at, and tuning for it: CPU flags, the precision 'auto' resolves to, and the
glibc allocator setting the CPU trainer runs under. No model, data or training code lives here."""
from __future__ import annotations

import math
import os
import platform
import shutil
import sys
import time

import torch
import torch.nn.functional as F

__all__ = ["resolve_precision", "resolve_compile", "tune_cpu_allocator", "COMPILE_MIN_STEPS", "machine_info",
           "matmul_peak"]


def _cpu_flags() -> set[str]:
    """The instruction-set flags of the first CPU in /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' only where bf16 is fast: CUDA with bf16 support, or a CPU with
    avx512_bf16 / amx_bf16 (on AVX2-only CPUs bf16 autocast is ~40x slower than fp32)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if _cpu_flags() & {"avx512_bf16", "amx_bf16"} else "fp32"
    return "fp32"


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Let glibc malloc keep freed memory for reuse instead of handing it back to the OS after every
    step (M_MMAP_THRESHOLD / M_TRIM_THRESHOLD), so that a CPU training step no longer page-faults its
    activations in afresh: ~4,000-20,000 page faults and 4-5% of the step time for the cpu-profile ViTs.
    The cost is that the process keeps its peak heap. Linux/glibc only; VITREPRO_TUNE_MALLOC=0 disables.
    Returns whether the tuning is in effect."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if os.environ.get("VITREPRO_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        _ALLOCATOR_TUNED = bool(libc.mallopt(m_mmap_threshold, 256 << 20)) and bool(
            libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False
    return _ALLOCATOR_TUNED


# torch.compile (inductor) on the CPU fuses a small ViT's LayerNorms, GELUs, softmaxes, casts and residual adds
# into a few C++ loops. Measured on the cpu-profile ViTs (bf16, batch 128, one thread per run, the sweep
# benchmark `python -m vitrepro.bench --sweep`, results/benchmarks/sweep_cpu.md): see that file for the figures
# per model. The first compile of a shape costs 20-40 s (later runs of the same shape load it from inductor's
# on-disk cache in ~2 s), so 'auto' compiles only runs long enough to pay that back. fp32 CPU runs were slower
# compiled on the AMX machine (ViT-Nano/4 868 vs 996 img/s); on an AVX2-only CPU, where fp32 is what 'auto' trains,
# compiled steps ran 0.91-1.19x the eager ones by model, and a 600-step ViT-Nano/4 run took 243 s compiled against
# 187 s eager, its cold compile included (benchmarks/README.md), so 'auto' leaves fp32 eager; CUDA is left to the
# user ('on').
COMPILE_MIN_STEPS = 400
COMPILE_FAMILIES = ("vit", "bit")  # hybrids measured no faster compiled (1.02x)


def _cxx_compiler() -> str | None:
    """The C++ compiler inductor's CPU backend would use ($CXX, else c++ / g++ / clang++ on PATH)."""
    cands = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    return next((c for c in cands if shutil.which(c)), None)


def resolve_compile(setting: str, device: torch.device, precision: str, family: str, steps: int | None) -> bool:
    """Whether a run trains through torch.compile. 'on' / 'off' are obeyed ('on' needs a C++ compiler on a
    CPU); 'auto' compiles CPU bf16 ViT and BiT runs of at least COMPILE_MIN_STEPS steps when a C++ compiler exists
    (VITREPRO_COMPILE=0 turns 'auto' off, e.g. where compiling is not wanted)."""
    if setting in ("on", "off"):
        return setting == "on"
    if os.environ.get("VITREPRO_COMPILE", "1") == "0":
        return False
    return (device.type == "cpu" and precision == "bf16" and family in COMPILE_FAMILIES
            and steps is not None and steps >= COMPILE_MIN_STEPS and _cxx_compiler() is not None)


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
