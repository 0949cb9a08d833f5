"""The machine line benchmarks print beside their figures names the CPU and its vector extensions."""

from __future__ import annotations

import pytest

from benchmarks import machine

pytestmark = pytest.mark.fast


def test_names_the_model_and_only_the_vector_extensions_present(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n")
    line = machine.describe(cpuinfo)
    assert line.startswith("AMD EPYC, ") and line.endswith(" avx2")
    assert "avx512f" not in line
    cpuinfo.write_text("model name\t: X\nflags\t\t: avx2 avx512f amx_tile\n")
    assert machine.describe(cpuinfo).endswith("avx2 avx512f amx_tile")
