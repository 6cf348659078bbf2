"""2:4 semi-structured sparse matmul against dense, on the GPU (fp16), in one run.

    python benchmarks/bench_semistructured.py                 # CUDA only; on CPU it says so, exit 0
    python benchmarks/bench_semistructured.py --tokens 2048 8192 --iters 100

For every linear shape of Gemma-3-270M (hidden 640, intermediate 2048, q 1024, k/v 256) and a
4096 x 4096 one, a random fp16 weight gets a 2:4 mask (the 2 largest |w| of every 4 consecutive
inputs kept, as SparseGPT's 2:4 mode leaves it), is converted with
torch.sparse.to_sparse_semi_structured, and F.linear(x, W) is timed dense and sparse for a batch
of tokens x (tokens, d_in). Prints the median time of each and the speedup dense / sparse, per
backend (cuSPARSELt where available, CUTLASS), plus the largest deviation of the sparse result
from the dense one. A shape or backend the kernels refuse is reported as such and skipped.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

# (name, d_out, d_in) as F.linear weights; Gemma-3-270M: 4 query heads and 1 kv head of 256.
SHAPES = (
    ("q_proj", 1024, 640),
    ("k_proj / v_proj", 256, 640),
    ("o_proj", 640, 1024),
    ("gate_proj / up_proj", 2048, 640),
    ("down_proj", 640, 2048),
    ("qkv fused", 1536, 640),
    ("gate+up fused", 4096, 640),
    ("square 4096", 4096, 4096),
)


def two_four(W: torch.Tensor) -> torch.Tensor:
    """W with the 2 smallest |w| of every 4 consecutive inputs of a row set to zero."""
    groups = W.reshape(-1, 4)
    drop = groups.abs().argsort(dim=1)[:, :2]
    return groups.scatter(1, drop, 0).reshape(W.shape)


def median_ms(fn, iters: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def backends() -> list[tuple[str, bool]]:
    """(name, force CUTLASS) for the backends this torch build has."""
    from torch.sparse import SparseSemiStructuredTensor

    found = []
    if getattr(torch.backends, "cusparselt", None) is not None and torch.backends.cusparselt.is_available():
        found.append(("cuSPARSELt", False))
    if hasattr(SparseSemiStructuredTensor, "_FORCE_CUTLASS"):
        found.append(("CUTLASS", True))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_semistructured: CUDA is not available; 2:4 semi-structured kernels run only on NVIDIA GPUs "
              "(compute capability >= 8.0). Nothing measured.")
        return 0
    try:
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured
    except ImportError as exc:
        print(f"bench_semistructured: this torch ({torch.__version__}) has no semi-structured sparsity: {exc}")
        return 0
    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    print(f"torch {torch.__version__}, {name} (sm_{major}{minor}), fp16, median of {args.iters} runs")
    if major < 8:
        print("semi-structured sparsity needs compute capability >= 8.0; nothing measured")
        return 0
    found = backends()
    if not found:
        print("no semi-structured backend (cuSPARSELt or CUTLASS) in this torch build; nothing measured")
        return 0
    torch.manual_seed(0)
    header = f"{'linear':<20} {'d_out x d_in':>12} {'tokens':>6} {'backend':>10} {'dense ms':>9} {'sparse ms':>9} " \
             f"{'speedup':>8} {'max rel err':>11}"
    print(header)
    print("-" * len(header))
    failures = []
    speedups: dict[str, list[float]] = {}
    for label, d_out, d_in in SHAPES:
        W = two_four(torch.randn(d_out, d_in, device="cuda", dtype=torch.float16))
        for backend, cutlass in found:
            SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
            try:
                Ws = to_sparse_semi_structured(W)
            except Exception as exc:  # noqa: BLE001 — report any refusal and go on
                failures.append(f"{label} {d_out}x{d_in} {backend}: conversion failed: {type(exc).__name__}: {exc}")
                continue
            for tokens in args.tokens:
                x = torch.randn(tokens, d_in, device="cuda", dtype=torch.float16)
                try:
                    dense_out = F.linear(x, W)
                    sparse_out = F.linear(x, Ws)
                    err = ((sparse_out.float() - dense_out.float()).abs().max() /
                           dense_out.float().abs().max().clamp(min=1e-6)).item()
                    dense = median_ms(lambda x=x, W=W: F.linear(x, W), args.iters)
                    sparse = median_ms(lambda x=x, Ws=Ws: F.linear(x, Ws), args.iters)
                except Exception as exc:  # noqa: BLE001
                    failures.append(f"{label} {d_out}x{d_in} tokens={tokens} {backend}: {type(exc).__name__}: {exc}")
                    continue
                speedups.setdefault(backend, []).append(dense / sparse)
                print(f"{label:<20} {f'{d_out}x{d_in}':>12} {tokens:>6} {backend:>10} {dense:>9.4f} {sparse:>9.4f} "
                      f"{dense / sparse:>7.2f}x {err:>11.2e}")
    print()
    for backend, values in speedups.items():
        geo = torch.tensor(values).log().mean().exp().item()
        print(f"{backend}: speedup dense/sparse over {len(values)} cases: geometric mean {geo:.2f}x, "
              f"min {min(values):.2f}x, max {max(values):.2f}x")
    if failures:
        print(f"\n{len(failures)} case(s) not measured:")
        for line in failures:
            print("  " + line.splitlines()[0][:300])
    return 0


if __name__ == "__main__":
    sys.exit(main())
