"""What this machine is good at, and tuning for it: CPU flags, the precision 'auto' resolves to, and the
glibc allocator setting the CPU trainer runs under. No model, data or training code lives here."""
from __future__ import annotations

import os
import sys

import torch

__all__ = ["resolve_precision", "tune_cpu_allocator"]


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
