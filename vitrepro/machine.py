"""What this machine is good at, and tuning for it: CPU flags, what the precision and compile settings 'auto'
resolve to, and the glibc allocator setting the CPU trainer runs under. No model, data or training code."""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import sys

import torch

__all__ = ["resolve_precision", "resolve_compile", "tune_cpu_allocator", "COMPILE_MIN_STEPS"]


def _cpu_flags() -> set[str]:
    """The instruction-set flags of the first CPU in /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1] for line in f if line.startswith("flags")), "").split())
    except OSError:
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
    """Let glibc malloc keep freed memory for reuse (M_MMAP_THRESHOLD / M_TRIM_THRESHOLD) instead of handing it
    back to the OS after every step, so that a CPU step no longer page-faults its activations in afresh (~4-5% of
    the step; benchmarks/README.md); the process keeps its peak heap. Linux/glibc only; VITREPRO_TUNE_MALLOC=0
    disables. Returns whether the tuning is in effect."""
    global _ALLOCATOR_TUNED
    if not _ALLOCATOR_TUNED and os.environ.get("VITREPRO_TUNE_MALLOC", "1") != "0" and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_threshold = -1, -3
            _ALLOCATOR_TUNED = bool(libc.mallopt(m_mmap_threshold, 256 << 20)) and bool(
                libc.mallopt(m_trim_threshold, 1 << 30))
    return _ALLOCATOR_TUNED


# torch.compile (inductor) fuses a small ViT's norms, activations, casts and residual adds into a few C++ loops on
# the CPU. A shape's first compile costs 20-40 s (later ones load inductor's disk cache in ~2 s), so 'auto' compiles
# only runs long enough to pay that back, and only bf16: fp32 runs were no faster compiled, CUDA is left to the user
# ('on'). Measurements: `python -m benchmarks.bench --sweep` and benchmarks/README.md.
COMPILE_MIN_STEPS = 400
COMPILE_FAMILIES = ("vit", "bit")  # hybrids measured no faster compiled (1.02x)


def _cxx_compiler() -> str | None:
    """The C++ compiler inductor's CPU backend would use ($CXX, else c++ / g++ / clang++ on PATH)."""
    cands = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    return next((c for c in cands if shutil.which(c)), None)


def resolve_compile(setting: str, device: torch.device, precision: str, family: str, steps: int | None) -> bool:
    """Whether a run trains through torch.compile: 'on' / 'off' are obeyed ('on' needs a C++ compiler on a
    CPU); 'auto' compiles CPU bf16 ViT and BiT runs of at least COMPILE_MIN_STEPS steps where a C++ compiler
    exists, unless VITREPRO_COMPILE=0."""
    if setting in ("on", "off"):
        return setting == "on"
    if os.environ.get("VITREPRO_COMPILE", "1") == "0":
        return False
    return (device.type == "cpu" and precision == "bf16" and family in COMPILE_FAMILIES
            and steps is not None and steps >= COMPILE_MIN_STEPS and _cxx_compiler() is not None)
