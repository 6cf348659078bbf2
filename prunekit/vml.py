"""First calls of MKL's vector math functions, made once per process on one thread.

On the CPU, PyTorch computes cos, sin, exp, log, sqrt, tanh, erf... of float32 and float64
tensors with MKL's vector math library (VML), in chunks of 2,048 elements shared out over its
OpenMP threads. MKL picks each function's code path on its first call. When that first call
comes from two threads at once, one of them can compute that call on another path: with
torch 2.13 (MKL 2024.2, 2 threads), the cos of a 128 x 64 rotary-embedding table came out
with every element of the second thread's half off by up to 1.5e-4 (relative) in 7 of 30
fresh processes, the first half and every later call exact. A decoder's rotary table is
computed once per stage, so the Hessians of a whole run (from the first attention output
on) differed between two runs of one stage on one machine.

`warm_up()` makes those first calls on tensors below one chunk, so they run on the calling
thread alone, before any computation. Importing this module calls it (`prunekit.kernels` and
`prunekit.models` import it); code that computes with torch before importing prunekit should
call it first.
"""
from __future__ import annotations

import functools

import torch

# Every unary float op ATen hands to VML (aten/src/ATen/cpu/vml.h), plus the few near them.
_FUNCTIONS = ("abs", "acos", "asin", "atan", "ceil", "cos", "cosh", "erf", "erfc", "erfinv", "exp", "expm1", "floor",
              "lgamma", "log", "log10", "log1p", "log2", "neg", "reciprocal", "round", "rsqrt", "sigmoid", "sin",
              "sinh", "sqrt", "tan", "tanh", "trunc")


@functools.cache
def warm_up() -> None:
    """Call each VML-backed function once per float dtype on the calling thread (idempotent)."""
    for dtype in (torch.float32, torch.float64):
        x = torch.linspace(0.1, 0.9, 16, dtype=dtype)  # inside every function's domain
        for name in _FUNCTIONS:
            getattr(torch, name)(x)


warm_up()
