"""CPU capability detection and the job processes' allocator setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from synthray.models.runtime import (
    BF16_MARGIN,
    bf16_probe_seconds,
    cpu_autocast,
    cpu_bf16_fast,
    cpu_compute_dtype,
    cpu_has_bf16_units,
)

CPUINFO = Path("/proc/cpuinfo")


@pytest.mark.skipif(not CPUINFO.exists(), reason="needs Linux's /proc/cpuinfo")
def test_bf16_is_used_where_the_cpu_has_the_units_and_they_measure_faster() -> None:
    flags = set()
    for line in CPUINFO.read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    units = bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
    assert cpu_has_bf16_units() == units
    if not units:
        assert not cpu_bf16_fast()  # emulated bf16 is never timed, let alone used
    else:
        # The process's answer came from the same probe, timed once: far from the margin,
        # a second timing agrees with it.
        seconds = bf16_probe_seconds()
        ratio = seconds["bf16"] / seconds["fp32"]
        if ratio <= BF16_MARGIN / 2:
            assert cpu_bf16_fast(), seconds
        if ratio >= 1.25:  # bf16 clearly the slower (1.84x fp32's time on one Xeon)
            assert not cpu_bf16_fast(), seconds
    assert cpu_compute_dtype() == (torch.bfloat16 if cpu_bf16_fast() else torch.float32)
    x = torch.ones(4, 4)
    with cpu_autocast():
        y = x @ x
    assert y.dtype == cpu_compute_dtype()


# Four rounds of allocating and freeing 48, 64 and 32 MiB tensors (all above glibc's largest
# mmap threshold, as a 128 px training step's activations are); prints the page faults of the
# last round.
_FAULTS = """
import resource, sys, torch
from synthray.models.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    before = faults()
    xs = [torch.ones(n << 20) for n in (12, 16, 8)]
    del xs
print(faults() - before)
"""


def _last_round_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_refaults_fewer_large_tensor_pages() -> None:
    default = _last_round_faults("default")
    kept = _last_round_faults("keep")
    assert default > 30_000  # 144 MiB of fresh 4 KiB pages, faulted in again every round
    # Not zero: torch asks posix_memalign for a little more than a freed block of the same
    # size holds, so glibc reuses only some of them (44% here; training steps reuse more).
    assert kept <= default // 2
