"""Numeric precision: the one policy every torch loop follows (embedding, training, pretraining).

A precision is a name: `auto`, `fp32`, `bf16` or `fp16`. `resolve_precision` turns the requested
name into the one a loop runs with, and `autocast_for` turns that into an autocast context.

| requested | CUDA, inference | CUDA, training | CPU | other devices |
| --- | --- | --- | --- | --- |
| `auto` | fp16 | bf16 where the card has it, else fp16 | bf16 with native bf16, else fp32 | fp32 |
| `fp32`, `bf16` | kept | kept | kept | kept |
| `fp16` | kept | kept | refused | refused |

Why:
- An explicit choice is kept: the operator asked for it. fp16 off CUDA is refused, naming what
  to use instead: on a CPU bf16 saves the same memory and keeps fp32's range.
- Inference on CUDA takes fp16: it has three more mantissa bits than bf16, and these normalised
  inputs never reach fp16's overflow.
- Training on CUDA takes bf16 where the card has it: gradients and losses can overflow fp16's
  range, bf16 has fp32's. Older cards get fp16 (the loops scale the loss for it).
- On a CPU, bf16 only where the CPU has native bf16 instructions; emulated bf16 is slower than
  fp32, so there `auto` keeps fp32.
"""

from __future__ import annotations

import contextlib

import torch

from mri_assets.core.compute_choices import PRECISIONS

PURPOSES = ("inference", "training")

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(ValueError):
    """A precision that is unknown or does not fit the device; the message says what to use."""


def _allowed(names: tuple[str, ...]) -> str:
    return ", ".join(repr(name) for name in names)


def cpu_has_native_bf16() -> bool:
    """True when this CPU runs bf16 in hardware: AVX-512 BF16 or AMX.

    Not oneDNN's `torch.ops.mkldnn._is_mkldnn_bf16_supported()`: that is true on every AVX-512
    CPU (Skylake, Cascade Lake), where oneDNN emulates bf16 and runs it slower than fp32. These
    private torch probes may be missing or fail in some builds; then the answer is False, and
    fp32 is always correct. ARM bf16 is not detected (fp32 there).

    The CPU must also be allowed to use it: with torch's kernels capped below AVX-512
    (`ATEN_CPU_CAPABILITY=avx2`, as on a CPU without AVX-512), bf16 runs in emulation, many
    times slower than fp32 (a stage-2 training step: 7.5 s against 0.5 s), so the answer is False.
    """
    try:
        hardware = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        kernels = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return False
    return bool(hardware) and kernels.startswith("AVX512")


def resolve_precision(
    device: torch.device | str, requested: str = "auto", purpose: str = "inference"
) -> str:
    """The precision to run with on `device`: `fp32`, `bf16` or `fp16` (the policy above).

    `purpose` is `inference` or `training`; it matters only for `auto` on CUDA. Raises
    `PrecisionError` for an unknown name or fp16 off CUDA.
    """
    device = torch.device(device)
    if requested not in PRECISIONS:
        raise PrecisionError(
            f"unknown precision {requested!r}: allowed values are {_allowed(PRECISIONS)}"
        )
    if purpose not in PURPOSES:
        raise PrecisionError(
            f"unknown purpose {purpose!r}: allowed values are {_allowed(PURPOSES)}"
        )
    if requested == "fp16" and device.type != "cuda":
        raise PrecisionError(
            f"precision 'fp16' is for CUDA, not {device.type}; use 'bf16', 'fp32' or 'auto'"
        )
    if requested != "auto":
        return requested
    if device.type == "cuda":
        if purpose == "training" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def autocast_for(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to `precision` (as `resolve_precision` gives it) on `device`; fp32 is a no-op."""
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in _AUTOCAST_DTYPES:
        raise PrecisionError(
            f"autocast needs a resolved precision, got {precision!r}: "
            f"use {_allowed(('fp32', *_AUTOCAST_DTYPES))}"
        )
    return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[precision])
