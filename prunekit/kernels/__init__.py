"""Numerical compression kernels: pure functions of tensors, no model or pipeline knowledge.

Every kernel takes a weight matrix W (d_out, d_in) on any device and dtype, computes in fp32
and returns a `KernelResult` with a new tensor of W's shape, dtype and device; inputs are
never modified.

- `factorize(H)`: Hessian -> `HessianFactor` (shared by linears reading the same input).
- `sparsegpt` / `sparsegpt_many`: SparseGPT pruning, optionally joint with quantization.
- `gptq`: GPTQ quantization (keeps existing zeros of a pruned W); `rtn`: plain rounding to its grids.
- `wanda`, `magnitude`: score-based pruning without reconstruction.
"""

from prunekit import vml  # noqa: F401  (first: its first calls of MKL's math functions, on import)
from prunekit.kernels.gptq import gptq, rtn
from prunekit.kernels.hessian import HessianFactor, factorize
from prunekit.kernels.quant import QuantSpec
from prunekit.kernels.result import KernelResult
from prunekit.kernels.score_based import magnitude, wanda
from prunekit.kernels.sparsegpt import sparsegpt, sparsegpt_many

__all__ = [
    "HessianFactor",
    "KernelResult",
    "QuantSpec",
    "factorize",
    "gptq",
    "magnitude",
    "rtn",
    "sparsegpt",
    "sparsegpt_many",
    "wanda",
]
