"""Where and how the networks run: device, precision and process memory, decided once.

:func:`resolve_device` and :func:`resolve_precision` turn the ``auto`` settings into a torch
device and a precision name; :func:`to_channels_last` puts a network in NHWC layout;
:func:`keep_freed_memory` tunes glibc for processes that exist to train.

Which precision pays on a CPU:

bf16 halves memory traffic and, on CPUs with native bf16 units, doubles to quadruples matmul
and convolution speed: AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake and later) or AMX
(Intel Sapphire Rapids and later; a 2048x2048 bf16 matmul reached 2,500 GFLOP/s on 2 cores
against 390 in fp32). Without them, oneDNN and MKL emulate bf16, and it is a trap: on an AMD
Zen 3 (AVX2 only) the same matmul ran at 0.3 GFLOP/s against 119 in fp32, and a bf16
convolution at 1/8 of the fp32 speed. So every CPU path that would autocast to bf16 (training,
sampling, the copy-detection embedding, the quality classifier's scoring for a choice, the
nearest-neighbour shortlist)
asks :func:`cpu_bf16_fast` first and stays in fp32 where it is False.

The units are necessary, not sufficient: on a 2-core Intel Xeon that reports AVX512-BF16 but
no AMX, a 2048x2048 matmul ran at 61 GFLOP/s in bf16 against 110 in fp32, and a 128 px latent
flow trained slower in bf16 than in fp32 (README, "CPU precision"). So the answer is
measured: where torch's own CPU feature probes (``torch.cpu._is_avx512_bf16_supported``,
``torch.cpu._is_amx_tile_supported``, which read CPUID) report the units, a small matmul and
a small channels-last convolution, the two kinds of work the networks are made of, are timed
in both precisions, alternating, once per process (:func:`_bf16_measured_faster`, about a
tenth of a second), and bf16 is used only if it is clearly faster (:data:`BF16_MARGIN`). If a
torch release drops the probes, the answer is False, which is slow on new CPUs but never
wrong. :func:`allow_cpu_bf16` turns bf16 off for the process whatever the CPU (the
``SYNTHRAY_CPU_BF16=off`` setting, applied in every worker process and read from the
environment at import, which is how the benchmarks take it): fp32 everywhere, as on a CPU
without bf16 units.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import os
import time

import torch
from torch import nn

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


_bf16_allowed = os.environ.get("SYNTHRAY_CPU_BF16", "auto") != "off"


def allow_cpu_bf16(allowed: bool) -> None:
    """Let :func:`cpu_bf16_fast` answer from the CPU (True, the default) or always False."""
    global _bf16_allowed
    _bf16_allowed = allowed


def cpu_bf16_fast() -> bool:
    """True if this CPU has native bf16 units (AVX512-BF16 or AMX), bf16 measured clearly
    faster than fp32 on them, and bf16 is allowed (:func:`allow_cpu_bf16`)."""
    return _bf16_allowed and cpu_has_bf16_units() and _bf16_measured_faster()


@functools.cache
def cpu_has_bf16_units() -> bool:
    """True if torch's CPUID probes report AVX512-BF16 or AMX."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and bool(fn()):
            return True
    return False


# bf16 is used where its probe work takes at most this share of fp32's time. Where it pays it
# pays by 2x or more (a Zen 4's AVX512-BF16: 410 against 190 GFLOP/s; AMX: 2,500 against
# 390); a CPU near the line gains little either way, and the margin keeps a noisy probe
# from choosing bf16 there.
BF16_MARGIN = 0.8
_PROBE_ROUNDS = 3


def bf16_probe_seconds() -> dict[str, float]:
    """The best of :data:`_PROBE_ROUNDS` alternating rounds of the probe work (a 512 x 1024
    by 1024 x 512 matmul and a 3 x 3 convolution of 64 channels on 8 x 32 x 32 inputs in
    channels-last layout, forward only) in fp32 and under bf16 autocast, in seconds."""
    with torch.inference_mode():
        a, b = torch.randn(512, 1024), torch.randn(1024, 512)
        conv = to_channels_last(nn.Conv2d(64, 64, 3, padding=1))
        x = torch.randn(8, 64, 32, 32).contiguous(memory_format=torch.channels_last)

        def work(bf16: bool) -> float:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                start = time.perf_counter()
                a @ b
                conv(x)
                return time.perf_counter() - start

        best = {"fp32": math.inf, "bf16": math.inf}
        for bf16 in (False, True):  # the first calls pick and prepare the kernels
            work(bf16)
        for _ in range(_PROBE_ROUNDS):
            best["fp32"] = min(best["fp32"], work(False))
            best["bf16"] = min(best["bf16"], work(True))
    return best


@functools.cache
def _bf16_measured_faster() -> bool:
    seconds = bf16_probe_seconds()
    return seconds["bf16"] <= BF16_MARGIN * seconds["fp32"]


def cpu_compute_dtype() -> torch.dtype:
    """bf16 where the CPU computes it natively, else fp32."""
    return torch.bfloat16 if cpu_bf16_fast() else torch.float32


def cpu_autocast() -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on CPU where it pays (see :func:`cpu_bf16_fast`), else a no-op."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16_fast())


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 on CUDA where supported, else fp16; on CPU it is bf16 (autocast +
    channels_last) where the CPU has bf16 units, else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_bf16_fast() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 training needs CUDA (GradScaler); use bf16 or fp32 on CPU")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None: no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def to_channels_last(net: nn.Module) -> nn.Module:
    """Switch ``net``'s 4-d parameters to NHWC in place (faster convolutions on CPU and CUDA)."""
    return net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # glibc <malloc.h> mallopt parameters


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc serve large blocks from the heap and keep freed pages for reuse.

    Training allocates and frees the same large activation tensors (tens of MB) every step.
    glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh ``mmap`` pages and
    returns them on free, so each step pays a page fault per 4 KiB of every such tensor, and
    shrinks the heap top past ``M_TRIM_THRESHOLD`` with the same effect. With mmap and
    trimming off, a 128 px projection-GAN step (batch 64, fp32, AVX2 CPU) faulted in 0 to
    22,000 pages instead of about 600,000, and ``benchmarks/train.py`` went from 45% to 67% of
    the fp32 matmul peak at 128 px (noisy host). Reuse is not perfect: torch's aligned
    allocations ask for a little more than a freed block of the same size holds. The cost:
    the process keeps its peak heap until it exits, so call this only in a process that
    exists to train (a worker's job child, a script). Returns False (and changes nothing)
    where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_MAX, 0),
            (_M_TRIM_THRESHOLD, 2**31 - 1),
            (_M_TOP_PAD, 512 << 20),
        )
    )
