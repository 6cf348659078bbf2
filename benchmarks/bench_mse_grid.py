"""GPTQ's mse grid search (`QuantSpec(mse=True)`): the compiled search against the torch one.

On Gemma-3-270M's tied head shape (262144 x 640, groups of 128: 1.3 M rows of 128 values,
80 candidate ranges each) and on a 70%-sparse decoder linear, both paths run on the same
weights in one process; the script prints their times, the ratio and how many groups got the
same grid (where they differ, the two sums round differently; tests/test_kernels.py bounds
the error of the compiled choice against the torch optimum).

    python benchmarks/bench_mse_grid.py
"""
from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from prunekit.kernels import QuantSpec, native


def timed(spec: QuantSpec, W: torch.Tensor, compiled: bool) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
    with mock.patch.object(native, "available", lambda: compiled):
        start = time.perf_counter()
        grids = spec.group_grids(W)
        return time.perf_counter() - start, grids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--sym", action="store_true")
    args = parser.parse_args()
    if not native.available():
        raise SystemExit("the compiled kernels did not build here (no C compiler?): nothing to compare")
    g = torch.Generator().manual_seed(0)
    head = torch.randn(262144, 640, generator=g) * 0.02
    linear = torch.randn(2048, 640, generator=g) * 0.02
    linear *= torch.rand(linear.shape, generator=g) >= 0.7
    spec = QuantSpec(bits=args.bits, sym=args.sym, groupsize=128, mse=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.bits}-bit {'sym' if args.sym else 'asym'} g128")
    for name, W in (("head 262144x640", head), ("70%-sparse linear 2048x640", linear)):
        t_torch, (s0, z0) = timed(spec, W, compiled=False)
        t_native, (s1, z1) = timed(spec, W, compiled=True)
        same = float(((s0 == s1) & (z0 == z1)).float().mean())
        print(f"{name}: torch {t_torch:.2f} s, compiled {t_native:.2f} s, {t_torch / t_native:.1f}x; "
              f"same grid for {same:.5%} of the groups")


if __name__ == "__main__":
    main()
