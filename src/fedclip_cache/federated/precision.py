"""``federate --precision``: the dtype local training runs its forward passes in.

fp32 (the default) is the reference: every number of a run as before the option existed. ``bf16`` wraps the
forward passes of local training -- the adapter's forward (``train.batch_loss``) and the frozen text tower of
prompt learning (``prompts.PromptLearner``) -- in ``torch.autocast(device_type, dtype=torch.bfloat16)``: their
matmuls run in bfloat16 (inputs rounded to 8 bits of mantissa, products accumulated in fp32), while the trained
parameters (adapter weights, context vectors), their gradients' updates, the optimiser state (Adam moments, SGD
momentum), the loss, aggregation and evaluation all stay fp32. It is the same meaning as ``extract --precision
bf16`` (autocast around the encoder's forward); the cache's stored features are not changed by either.

bf16 pays only where the hardware multiplies bfloat16 natively: on x86 CPUs with AVX512-BF16 or AMX-BF16 (oneDNN's
bf16 GEMM), on CUDA GPUs that report ``torch.cuda.is_bf16_supported()`` (Ampere and later). Elsewhere torch would
emulate it, slower than fp32, so ``--precision bf16`` is refused in one line (:func:`check_precision`).
:func:`cpu_flags` is the one place the CPU's abilities are read (tests monkeypatch it).

This module imports torch only inside its functions (``FederateConfig`` imports :data:`PRECISIONS`).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

from ..errors import ConfigError

PRECISIONS = ("fp32", "bf16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 dot products (x86)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (``/proc/cpuinfo``'s first ``flags`` line; empty where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_matmul(device) -> Optional[str]:
    """None when ``device`` multiplies bfloat16 natively, else why not (one phrase, for the refusal)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            return f"the GPU {torch.cuda.get_device_name(device)!r} has no bf16 matmul (Ampere or later has)"
        return None
    if device.type == "cpu":
        if not set(BF16_CPU_FLAGS) & cpu_flags():
            return f"this CPU has no bf16 matmul (none of the /proc/cpuinfo flags {', '.join(BF16_CPU_FLAGS)})"
        return None
    return f"bf16 training is not supported on {device.type} devices"


def check_precision(precision: str, device, flag: str = "--precision") -> None:
    """Refuse ``bf16`` in one line where :func:`bf16_matmul` says the hardware cannot (``flag``: the option as the
    user wrote it)."""
    if precision == "fp32":
        return
    why = bf16_matmul(device)
    if why is not None:
        raise ConfigError(f"{flag} {precision}: {why}; it would be emulated, slower than fp32: use {flag} fp32")


def autocast(precision: str, device):
    """The context local training runs its forward passes in: nothing for fp32, bf16 autocast otherwise."""
    if precision == "fp32":
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
