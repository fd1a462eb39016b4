"""Denormal (subnormal) floats flushed to zero on *every* thread that computes, not just the caller.

Why: on separable data the adapter's softmax gate and the contrastive logits saturate as training proceeds, and
their gradients fill with denormal floats (|x| < 1.2e-38). x86 cores handle those in microcode, tens of times
slower than normal floats, so the cost of a step grows within a round (DomainNet-shaped cache: 6 ms/step at the
start of a round, ~45 ms/step at its end). ``torch.set_flush_denormal(True)`` sets the FTZ/DAZ bits of the
*calling* thread's MXCSR only; torch's intra-op workers (an OpenMP pool, shared with MKL) keep their own and go on
paying the penalty. Measured (reading each worker's MXCSR from inside an OpenMP region): after
``set_flush_denormal(True)`` on the main thread the workers that already exist still have FTZ/DAZ off; threads the
pool creates *later* inherit the creating thread's floating-point environment (Linux/glibc), and
``torch.set_num_threads`` does not re-create existing workers.

How: :func:`flush_denormals` sets the mode on the caller with torch, copies the caller's floating-point
environment (``fegetenv``) and runs ``fesetenv(&env)`` on every thread of an OpenMP team of torch's thread count,
by calling the OpenMP runtime's ``GOMP_parallel(fesetenv, &env, 0, 0)`` through ctypes (no compiled code of our
own; libgomp, LLVM's libomp and Intel's libiomp5 all export that entry point). Threads the pool creates later
inherit the setting from the caller. On exit the caller's previous environment is restored the same way, on every
thread. Where that is not possible (no /proc, no OpenMP runtime loaded, not glibc) only the caller is set and
:func:`flush_denormals` reports ``"caller"``.

Effect on results: values below 1.2e-38 become 0 -- far below float32's resolution of anything they are added to
(the vectorised-equals-plain-loop tests hold under it). Opt out with ``federate --keep-denormals``.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys
import threading
from typing import Any, Iterator, NamedTuple, Optional

import torch

_LOCK = threading.Lock()
_FENV_BYTES = 64  # glibc x86-64 fenv_t is 32 bytes, aarch64 8; generous so fegetenv never writes past the end


class _Runtimes(NamedTuple):
    """The C entry points :func:`_broadcast_env` calls."""

    fegetenv: Any  # libm's fegetenv, callable
    fesetenv: ctypes.c_void_p  # libm's fesetenv, as the address GOMP_parallel calls on every thread
    parallels: list  # GOMP_parallel of each loaded OpenMP runtime


@functools.cache
def _runtimes() -> Optional[_Runtimes]:
    """The entry points, or None when unavailable (not Linux, no libm)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        fegetenv, fesetenv = libm.fegetenv, libm.fesetenv
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
        omp = sorted(p for p in paths if any(k in p.rsplit("/", 1)[-1] for k in ("libgomp", "libiomp5", "libomp")))
        parallels = []
        for p in omp:
            try:
                fn = ctypes.CDLL(p).GOMP_parallel
            except (OSError, AttributeError):
                continue
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
            fn.restype = None
            parallels.append(fn)
    except (OSError, AttributeError):
        return None
    fegetenv.argtypes = [ctypes.c_void_p]
    return _Runtimes(fegetenv, ctypes.cast(fesetenv, ctypes.c_void_p), parallels)


def _broadcast_env() -> bool:
    """Copy the calling thread's floating-point environment to every thread of the OpenMP pool(s)."""
    rt = _runtimes()
    if rt is None or not rt.parallels:
        return False
    env = (ctypes.c_byte * _FENV_BYTES)()
    if rt.fegetenv(ctypes.addressof(env)) != 0:
        return False
    for par in rt.parallels:  # num_threads 0: the default team size, i.e. torch.set_num_threads' value
        par(rt.fesetenv, ctypes.addressof(env), 0, 0)
    return True


def set_flush_denormal_all_threads(on: bool) -> str:
    """Set flush-to-zero / denormals-are-zero on the caller and every OpenMP worker. Returns ``"all threads"``,
    ``"caller"`` (workers could not be reached) or ``"unsupported"`` (the CPU has no such mode)."""
    torch.get_num_threads()  # make sure torch's thread pool settings are initialised before we size the team
    with _LOCK:
        if not torch.set_flush_denormal(on):
            return "unsupported"
        return "all threads" if _broadcast_env() else "caller"


def _caller_flushes() -> bool:
    """Whether the calling thread currently flushes denormals (observed, not remembered)."""
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # a denormal: with DAZ it reads as 0
    return bool((tiny * 0.5).view(torch.int32).item() == 0)


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[str]:
    """Within the block, denormals are flushed to zero on every thread that computes; the previous mode is
    restored on exit (on the caller and the workers). Yields where the setting took effect ("all threads",
    "caller", "unsupported", or "off" when not enabled)."""
    if not enabled:
        yield "off"
        return
    before = _caller_flushes()
    where = set_flush_denormal_all_threads(True)
    try:
        yield where
    finally:
        if where != "unsupported":
            set_flush_denormal_all_threads(before)


def workers_flush_denormals(n: int = 1 << 20) -> list[bool]:
    """Per quarter of a large elementwise op (spread over the intra-op threads), whether a denormal result was
    flushed to zero. Checked on the bit pattern, so the check itself does not depend on the mode."""
    x = torch.full((n,), 2e-38, dtype=torch.float32)  # normal; x * 0.25 is denormal unless flushed
    bits = (x * 0.25).view(torch.int32)
    return [bool((q == 0).all()) for q in bits.chunk(4)]
