"""What this machine is good at, and tuning for it: CPU flags, the precision 'auto' resolves to, and the
glibc allocator setting the CPU trainer runs under. No model, data or training code lives here."""
from __future__ import annotations

import os
import shutil
import sys

import torch

__all__ = ["resolve_precision", "resolve_compile", "tune_cpu_allocator", "COMPILE_MIN_STEPS"]


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
# benchmark `python -m benchmarks.bench --sweep`, results/benchmarks/sweep_cpu.md): see that file for the figures
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
