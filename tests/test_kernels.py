"""Numerical tests of prunekit.kernels against brute force on small problems."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from torch import Tensor

from prunekit.kernels import (
    HessianFactor,
    QuantSpec,
    factorize,
    gptq,
    magnitude,
    native,
    sparsegpt,
    sparsegpt_many,
    sweep,
    wanda,
)
from prunekit.kernels import rtn as kernels_rtn
from prunekit.kernels.masks import _stable_sort_prefix, smallest


def problem(d_out: int, d_in: int, *, n_tokens: int | None = None, seed: int = 0, dead: tuple[int, ...] = ()):
    """Weights W, inputs X = Z A (correlated, uneven feature scales) and H = (2/N) X^T X."""
    g = torch.Generator().manual_seed(seed)
    n_tokens = n_tokens or 4 * d_in
    Z = torch.randn(n_tokens, d_in, generator=g)
    A = torch.eye(d_in) + 0.5 * torch.randn(d_in, d_in, generator=g) / d_in**0.5
    X = (Z @ A) * torch.exp(torch.randn(d_in, generator=g))
    X[:, list(dead)] = 0
    W = torch.randn(d_out, d_in, generator=g)
    return W, X, 2 / n_tokens * X.T @ X


def damped(H: Tensor, percdamp: float = 0.01) -> Tensor:
    """The matrix factorize() factorises: dead H_jj -> 1, plus percdamp · mean(diag) · I (fp64)."""
    H = H.double().clone()
    H.diagonal()[H.diagonal() == 0] = 1
    H.diagonal().add_(percdamp * H.diagonal().mean())
    return H


def brute_force_obs(W: Tensor, H: Tensor, mask: Tensor) -> tuple[Tensor, float]:
    """SparseGPT's definition, without Cholesky tricks: visit columns left to right; pruning
    column j re-optimises the still free columns F = {j..n-1} exactly, i.e. minimises
    (w - ŵ)_F H_FF (w - ŵ)_F^T subject to ŵ_j = 0, which moves w_F by
    -w_j / [H_FF^-1]_00 · [H_FF^-1]_0,: at a loss of w_j^2 / [H_FF^-1]_00 / 2."""
    W = W.double().clone()
    loss = 0.0
    for j in range(W.shape[1]):
        H_inv = torch.linalg.inv(H[j:, j:])
        rows = mask[:, j]
        w_j = W[rows, j]
        loss += float((w_j**2).sum() / H_inv[0, 0] / 2)
        W[rows, j:] -= (w_j / H_inv[0, 0])[:, None] * H_inv[0][None, :]
        W[rows, j] = 0
    return W, loss


def eager_reference(
    W: Tensor,
    U: Tensor,
    *,
    sparsity: float = 0.0,
    prunen: int = 0,
    prunem: int = 0,
    blocksize: int = 128,
    fixed: Tensor | None = None,
    spec: QuantSpec | None = None,
) -> tuple[Tensor, float]:
    """The textbook column loop in fp64 with the kernels' documented rules: unstructured masks
    per block of `blocksize` columns, N:M masks when a group's first column is reached, grids
    when a quantization group's first column is reached (from current values, entries already
    known to be pruned zeroed), every error applied to all later columns at once."""
    W, U = W.double().clone(), U.double()
    d = U.diagonal()
    n = W.shape[1]
    mask = fixed.clone() if fixed is not None else torch.zeros_like(W, dtype=torch.bool)
    groupsize = (spec.groupsize or n) if spec else n
    loss = 0.0
    for j in range(n):
        if sparsity and j % blocksize == 0:
            block = slice(j, min(j + blocksize, n))
            scores = (W[:, block] ** 2 / d[block] ** 2).flatten()
            chosen = torch.zeros_like(scores, dtype=torch.bool)
            chosen[torch.argsort(scores, stable=True)[: round(sparsity * scores.numel())]] = True
            mask[:, block] = chosen.view(W.shape[0], -1)
        if prunem and j % prunem == 0:
            scores = W[:, j : j + prunem] ** 2 / d[j : j + prunem] ** 2
            mask[:, j : j + prunem].scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :prunen], True)
        q = W[:, j].clone()
        if spec is not None:
            if j % groupsize == 0:
                scale, zero = spec.grid(W[:, j : j + groupsize].masked_fill(mask[:, j : j + groupsize], 0).float())
            q = spec.quantize(q, scale.double(), zero.double())
        q[mask[:, j]] = 0
        err = (W[:, j] - q) / d[j]
        loss += float((err**2).sum() / 2)
        W[:, j] = q
        W[:, j + 1 :] -= err[:, None] * U[j, j + 1 :][None, :]
    return W, loss


def output_error(W: Tensor, W_hat: Tensor, X: Tensor) -> float:
    return float(((W - W_hat) @ X.T).norm() / (W @ X.T).norm())


def on_grid(weight: Tensor, scales: Tensor, zeros: Tensor, spec: QuantSpec, groups: Tensor) -> None:
    """Every entry is scale · (k - zero) for an integer k in [0, maxq] of its row's group."""
    s = scales[:, groups].double()
    z = zeros[:, groups].double()
    k = weight.double() / s + z
    assert torch.allclose(k, k.round(), atol=1e-4), float((k - k.round()).abs().max())
    assert float(k.round().min()) >= 0 and float(k.round().max()) <= spec.maxq
    assert torch.equal(zeros, zeros.round())


def use_compiled_sweep(monkeypatch: pytest.MonkeyPatch, compiled: bool) -> None:
    """Run the CPU sweep with the compiled block kernel (which must then build: a C compiler
    is on PATH) or with the PyTorch column loop."""
    if not compiled:
        monkeypatch.setattr(native, "available", lambda: False)
    elif os.environ.get("CC") is None and not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler: the compiled block kernel cannot be built here")
    else:
        assert native.available(), "a C compiler is on PATH but the native sweep kernel did not build"


# --- mask selection ------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["random", "ties", "sample_misleads", "arange"])
def test_smallest_is_the_stable_sort_prefix(case):
    """Large inputs take the sampled path; it must give exactly what a stable sort gives."""
    g = torch.Generator().manual_seed(0)
    n = 100_000
    x = torch.rand(n, generator=g)
    if case == "ties":
        x = torch.randint(0, 50, (n,), generator=g).float()
    elif case == "sample_misleads":
        x += 1
        x[::16] = 0
    elif case == "arange":
        x = torch.arange(n, dtype=torch.float32).flip(0)
    for k in (1, 777, n // 2, n - 3):
        expected = torch.zeros(n, dtype=torch.bool)
        expected[torch.argsort(x, stable=True)[:k]] = True
        assert torch.equal(smallest(x.view(250, 400), k).flatten(), expected)
        # the GPU's path (one sort), into a float view of a wider buffer as the sweep uses it
        out = torch.full((250, 800), 7.0)
        _stable_sort_prefix(x.view(250, 400), k, out[:, 200:600])
        assert torch.equal(out[:, 200:600].flatten(), expected.float()) and bool((out[:, :200] == 7).all())
    rows = x.view(250, 400)
    first = torch.argsort(rows, dim=1, stable=True)[:, :150]
    expected = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, first, True)
    assert torch.equal(smallest(rows, 150, dim=1), expected)


# --- factorize ---------------------------------------------------------------------------


def test_factorize_is_cholesky_of_damped_inverse():
    _, _, H = problem(4, 48, dead=(5, 17))
    f = factorize(H, percdamp=0.02)
    H_d = damped(H, 0.02)
    assert torch.allclose(f.U.double().T @ f.U.double() @ H_d, torch.eye(48, dtype=torch.float64), atol=1e-4)
    assert torch.equal(f.U, f.U.triu()) and bool((f.U.diagonal() > 0).all())
    assert f.dead.nonzero().flatten().tolist() == [5, 17]
    assert torch.equal(f.diag, H.diagonal())
    T, r = f.T.double(), f.r.double()
    assert torch.equal(f.T.diagonal(), torch.ones(48)) and torch.equal(f.T, f.T.triu())
    assert torch.allclose(T * r**2 @ T.T, H_d, rtol=1e-4, atol=1e-4 * float(H_d.diagonal().max()))
    assert torch.allclose(f.r, 1 / f.U.diagonal(), rtol=1e-5)


def test_factorize_falls_back_to_fp64():
    """An fp64 Hessian too ill-conditioned for fp32 Cholesky still factorises."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    H = Q @ torch.diag(torch.logspace(0, -12, 64, dtype=torch.float64)) @ Q.T
    assert int(torch.linalg.cholesky_ex(H.float())[1]) != 0
    f = factorize(H, percdamp=0.0)
    T, r = f.T.double(), f.r.double()
    assert bool(torch.isfinite(f.T).all()) and bool((f.r > 0).all())
    assert torch.allclose(T * r**2 @ T.T, H, atol=1e-6)


def test_factorize_rank_deficient_hessian_is_damped():
    W, X, H = problem(8, 64, n_tokens=16)
    assert int(torch.linalg.matrix_rank(H)) <= 16
    f = factorize(H)
    res = sparsegpt(W, f, 0.5)
    assert bool(torch.isfinite(f.U).all()) and bool(torch.isfinite(res.weight).all())
    assert output_error(W, res.weight, X) < output_error(W, magnitude(W, 0.5).weight, X)


@pytest.mark.parametrize(
    "H, percdamp",
    [
        (torch.ones(3, 4), 0.01),
        (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), 0.01),
        (-torch.eye(3), 0.01),
        (torch.tensor([[1.0, 2.0], [2.0, 1.0]]), 0.0),
        (torch.eye(3), -0.1),
        (torch.eye(3, dtype=torch.int64), 0.01),
    ],
)
def test_factorize_rejects_bad_input(H, percdamp):
    with pytest.raises(ValueError):
        factorize(H, percdamp)


# --- sparsegpt -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape, blocksize", [((8, 8), 8), ((16, 12), 12), ((16, 12), 4), ((6, 20), 7)])
def test_sparsegpt_equals_brute_force_obs_for_its_mask(shape, blocksize):
    W, _, H = problem(*shape, seed=shape[1])
    f = factorize(H)
    res = sparsegpt(W, f, 0.5, blocksize=blocksize)
    expected, loss = brute_force_obs(W, damped(H), res.weight == 0)
    assert torch.allclose(res.weight.double(), expected, atol=1e-4, rtol=1e-4)
    assert math.isclose(res.loss, loss, rel_tol=1e-4)


def test_sparsegpt_is_the_masked_least_squares_optimum_when_pruned_columns_come_first():
    """With every row pruned on the same leading columns S (and the survivors F after them),
    each OBS step re-optimises all survivors, so the sweep lands on the exact optimum
    min (w - ŵ) H (w - ŵ)^T s.t. ŵ_S = 0: ŵ_F = w_F + w_S H_SF H_FF^-1."""
    W, _, H = problem(16, 12, seed=3)
    W[:, :6] *= 1e-3
    res = sparsegpt(W, factorize(H), 0.5, blocksize=12)
    S, F = slice(0, 6), slice(6, 12)
    assert bool((res.weight[:, S] == 0).all()) and bool((res.weight[:, F] != 0).all())
    H_d, w = damped(H), W.double()
    optimum = w[:, F] + torch.linalg.solve(H_d[F, F], H_d[F, S] @ w[:, S].T).T
    assert torch.allclose(res.weight[:, F].double(), optimum, atol=1e-4, rtol=1e-4)
    delta = w - res.weight.double()
    assert math.isclose(res.loss, float(torch.einsum("ri,ij,rj->", delta, H_d, delta)) / 2, rel_tol=1e-4)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7, 0.99])
@pytest.mark.parametrize("d_in, blocksize", [(64, 128), (200, 128), (96, 32)])
def test_sparsegpt_hits_exact_sparsity_per_block(sparsity, d_in, blocksize):
    W, _, H = problem(24, d_in, seed=d_in)
    res = sparsegpt(W, factorize(H), sparsity, blocksize=blocksize)
    widths = [min(blocksize, d_in - a) for a in range(0, d_in, blocksize)]
    for a, width in zip(range(0, d_in, blocksize), widths):
        assert int((res.weight[:, a : a + width] == 0).sum()) == round(sparsity * 24 * width)
    assert bool(torch.isfinite(res.weight).all())


@pytest.mark.parametrize("prunen, prunem", [(2, 4), (4, 8), (1, 4), (3, 6)])
def test_sparsegpt_n_of_m_pattern(prunen, prunem):
    """(3:6 does not divide the compiled kernel's register block: the PyTorch loop runs.)"""
    assert native.handles_pattern(prunem) == (prunem != 6)
    W, _, H = problem(16, 72)
    res = sparsegpt(W, factorize(H), 0, prunen=prunen, prunem=prunem, blocksize=24)
    zeros = (res.weight == 0).reshape(16, -1, prunem).sum(dim=2)
    assert bool((zeros == prunen).all())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sparsity=0.6, blocksize=24),
        dict(sparsity=0.5, prunen=2, prunem=4, blocksize=24),
        dict(sparsity=0.5, blocksize=40, quant=QuantSpec(bits=4)),
        dict(sparsity=0.5, blocksize=24, quant=QuantSpec(bits=3, groupsize=20)),
        dict(sparsity=0.5, prunen=2, prunem=4, blocksize=16, quant=QuantSpec(bits=4, sym=True, groupsize=36)),
    ],
)
@pytest.mark.parametrize("classic", [False, True], ids=["deferred", "classic"])
@pytest.mark.parametrize("compiled", [False, True], ids=["torch-loop", "compiled"])
def test_sparsegpt_equals_eager_column_loop(monkeypatch, kwargs, classic, compiled):
    """Blocked/lazy updates (in either form: through U, or deferred through T), inner blocks or
    the compiled block kernel, and group grids give the eager loop's result."""
    monkeypatch.setattr(sweep, "_classic_form_is_cheaper", lambda n, R, blocksize: classic)
    use_compiled_sweep(monkeypatch, compiled)
    kwargs = dict(kwargs)
    W, _, H = problem(32, 72, seed=7)
    f = factorize(H)
    res = sparsegpt(W, f, **kwargs)
    sparsity = kwargs.pop("sparsity")
    if kwargs.get("prunem"):
        sparsity = 0.0
    expected, loss = eager_reference(W, f.U, sparsity=sparsity, spec=kwargs.pop("quant", None), **kwargs)
    close = torch.isclose(res.weight.double(), expected, atol=1e-4, rtol=1e-4)
    assert float(close.float().mean()) > 0.99
    assert math.isclose(res.loss, loss, rel_tol=1e-3)


@pytest.mark.parametrize("classic", [False, True], ids=["deferred", "classic"])
@pytest.mark.parametrize("blocksize", [128, 40])
@pytest.mark.parametrize("path", ["all-rows-solve", "compiled"])
def test_known_mask_block_paths_are_the_column_loop(monkeypatch, blocksize, classic, path):
    """The GPU's inner-block solve (batched triangular systems, one per row; here forced on the
    CPU, with row chunks smaller than R) and the CPU's compiled block kernel give the PyTorch
    column loop's result."""
    monkeypatch.setattr(sweep, "_classic_form_is_cheaper", lambda n, R, blocksize: classic)
    W, _, H = problem(53, 200, seed=3)  # 53 rows: tiles of the compiled kernel left partial
    f = factorize(H)
    Ws = [W[:30], W[30:]]
    use_compiled_sweep(monkeypatch, False)
    loop = sparsegpt_many(Ws, f, [0.7, 0.4], blocksize=blocksize)
    if path == "all-rows-solve":
        monkeypatch.setattr(sweep, "_solve_all_rows_at_once", lambda Wt: True)
        monkeypatch.setattr(sweep, "_BATCHED_BYTES", 5 * 40 * 40 * 4)  # 1 and 5 rows per chunk
    else:
        monkeypatch.undo()
        monkeypatch.setattr(sweep, "_classic_form_is_cheaper", lambda n, R, blocksize: classic)
        use_compiled_sweep(monkeypatch, True)
    other = sparsegpt_many(Ws, f, [0.7, 0.4], blocksize=blocksize)
    for a, b in zip(loop, other):
        assert torch.equal(a.weight == 0, b.weight == 0)
        assert torch.allclose(a.weight, b.weight, atol=1e-5, rtol=1e-4)
        assert math.isclose(a.loss, b.loss, rel_tol=1e-5)


@pytest.mark.parametrize(
    "width, rows, nm",
    [(128, 64, None), (40, 37, None), (16, 1, None), (128, 37, (2, 4)), (40, 20, (1, 4)), (48, 17, (5, 8))],
)
def test_compiled_block_is_the_eager_column_loop_bit_for_bit(monkeypatch, width, rows, nm):
    """The C kernel on a block view of a wider W^T (row stride > R; 37 rows: a partial vector
    tile; width 40: a partial register block) equals the column loop exactly: the same
    operations in the same order for every entry, no floating point contraction. With N:M the
    masks are chosen in the loop as `smallest` chooses them (1:4 on integer weights: ties)."""
    use_compiled_sweep(monkeypatch, True)
    g = torch.Generator().manual_seed(11)
    Wt = torch.randn(width + 8, rows + 5, generator=g)
    if nm == (1, 4):
        Wt = torch.randint(-2, 3, Wt.shape, generator=g).float()
    block = Wt[4 : 4 + width, 2 : 2 + rows]
    mask = (torch.rand(width, rows, generator=g) < 0.6).float()
    N = (0.3 * torch.randn(width, width, generator=g)).triu(1)
    r2 = torch.rand(width, generator=g) + 0.5
    prunen, prunem = nm or (0, 0)
    expected, expected_err, used = block.clone(), torch.empty(width, rows), mask.clone()
    for j in range(width):
        if prunem and j % prunem == 0:
            scores = expected[j : j + prunem].square() * r2[j : j + prunem, None]
            used[j : j + prunem] = smallest(scores, prunen, dim=0, dtype=torch.float32)
        e = expected[j] * used[j]
        expected_err[j] = e
        expected[j + 1 :] -= N[j, j + 1 :, None] * e
        expected[j] -= e
    untouched = Wt.clone()
    err = torch.full((width, rows), float("nan"))
    native.masked_block(block, mask, N, err, r2=r2, prunen=prunen, prunem=prunem)
    assert torch.equal(block, expected) and torch.equal(err, expected_err)
    if prunem:
        assert bool(((block == 0).view(-1, prunem, rows).sum(dim=1) >= prunen).all())
    assert bool((block[used == 1] == 0).all())
    outside = torch.ones_like(Wt, dtype=torch.bool)
    outside[4 : 4 + width, 2 : 2 + rows] = False
    assert torch.equal(Wt[outside], untouched[outside])


@pytest.mark.parametrize("case", ["random", "ties", "zeros", "k=1", "k=n-1", "small"])
def test_compiled_selection_is_the_stable_sort_prefix(monkeypatch, case):
    """The compiled mask choice equals `smallest` on the same scores and the first k of a stable
    sort, on a strided block: ties (few distinct values, dead-column zeros) go to the lower flat
    position, exactly k are chosen."""
    use_compiled_sweep(monkeypatch, True)
    g = torch.Generator().manual_seed(2)
    width, rows = (7, 9) if case == "small" else (128, 300)
    Wt = torch.randn(width + 2, rows + 6, generator=g)
    if case == "ties":
        Wt = torch.randint(-2, 3, Wt.shape, generator=g).float()
    if case == "zeros":
        Wt[:, :40] = 0
    block = Wt[1 : 1 + width, 3 : 3 + rows]
    r2 = torch.rand(width, generator=g) + 0.5
    if case == "ties":
        r2 = torch.ones(width)
    n = width * rows
    k = {"k=1": 1, "k=n-1": n - 1}.get(case, round((0.6 if case == "zeros" else 0.7) * n))
    scores = block.square() * r2[:, None]
    first_k = torch.zeros(n)
    first_k[torch.argsort(scores.flatten(), stable=True)[:k]] = 1
    out = torch.full((width, rows + 4), 7.0)
    got = native.smallest_scores(block, r2, k, out=out[:, 2 : 2 + rows])
    assert torch.equal(got, first_k.view(width, rows))
    assert torch.equal(got, smallest(scores, k, dtype=torch.float32))
    assert bool((out[:, :2] == 7).all() and (out[:, -2:] == 7).all())


@pytest.mark.parametrize("rows, cols", [(37, 53), (64, 32), (1, 17)])
def test_compiled_transpose(monkeypatch, rows, cols):
    """Into a column slice of a wider destination, from a row slice of a wider source (partial
    tiles at both edges); other dtypes take PyTorch's copy."""
    use_compiled_sweep(monkeypatch, True)
    g = torch.Generator().manual_seed(4)
    src = torch.randn(rows + 3, cols + 5, generator=g)[1 : 1 + rows, 2 : 2 + cols]
    dest = torch.full((cols, rows + 9), 7.0)
    native.transpose(src, out=dest[:, 4 : 4 + rows])
    assert torch.equal(dest[:, 4 : 4 + rows], src.T)
    assert bool((dest[:, :4] == 7).all() and (dest[:, 4 + rows :] == 7).all())
    assert torch.equal(native.transpose(src), src.T) and native.transpose(src).is_contiguous()
    assert torch.equal(native.transpose(src.bfloat16()), src.bfloat16().T)


@pytest.mark.parametrize("bits, sym, groupsize, density", [(4, False, 128, 1.0), (4, True, 128, 0.3), (3, False, None, 0.3),
                                                       (8, True, 64, 1.0), (2, False, 32, 1.0)])
def test_compiled_mse_grid_search_picks_the_ranges_of_the_torch_search(monkeypatch, bits, sym, groupsize, density):
    """Same candidates, same quantizer: the compiled search (native.mse_grid) picks the torch
    search's range for nearly every row, and where it differs (its sums round differently)
    its range's error, as the torch path sums it, is within 1e-5 of the torch optimum's; zero
    rows and pruned entries are handled as there."""
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(384, 256, generator=g) * torch.rand(384, 1, generator=g)
    W[:, torch.rand(256, generator=g) < 0.05] *= 8  # outliers: shrinking the range pays
    W *= torch.rand(W.shape, generator=g) < density
    W[3] = 0
    spec = QuantSpec(bits=bits, sym=sym, groupsize=groupsize, mse=True)
    use_compiled_sweep(monkeypatch, True)
    fast = spec.group_grids(W)
    monkeypatch.setattr(native, "available", lambda: False)
    slow = spec.group_grids(W)
    same = (fast[0] == slow[0]) & (fast[1] == slow[1])
    assert float(same.float().mean()) >= 0.99

    def error(scale, zero):  # the torch search's sum, per group and row
        gs = groupsize or W.shape[1]
        parts = W.reshape(W.shape[0], -1, gs).transpose(0, 1)
        return (spec.quantize(parts, scale[..., None], zero[..., None]) - parts).abs().pow(2.4).sum(-1)

    assert bool((error(*fast) <= error(*slow) * (1 + 1e-5)).all())
    assert bool((fast[0] > 0).all()) and torch.equal(fast[1], fast[1].round())


def test_sweep_falls_back_to_the_torch_loop_without_the_compiled_kernel(monkeypatch, caplog):
    """PRUNEKIT_NATIVE=0 or a missing compiler: no kernels, a log line, and the sweep still runs."""
    monkeypatch.setenv("PRUNEKIT_NATIVE", "0")
    assert native._build.__wrapped__() == (None, None)
    monkeypatch.setenv("PRUNEKIT_NATIVE", "1")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level("WARNING", logger="prunekit.kernels.native"):
        assert native._build.__wrapped__() == (None, None)
    assert "could not build the native sweep kernels" in caplog.text
    monkeypatch.setattr(native, "_build", native._build.__wrapped__)
    assert native.build() is None and not native.available()
    with pytest.raises(RuntimeError, match="not available"):
        native.smallest_scores(torch.ones(2, 3), torch.ones(2), 2, out=torch.empty(2, 3))
    W, _, H = problem(16, 40)
    assert int((sparsegpt(W, factorize(H), 0.5, blocksize=16).weight == 0).sum()) == 16 * 40 // 2


@pytest.mark.parametrize("spec", [QuantSpec(bits=4), QuantSpec(bits=3, groupsize=16), QuantSpec(bits=2, sym=True)])
def test_sparsegpt_joint_quantization_is_on_grid_and_keeps_zeros(spec):
    W, _, H = problem(16, 48)
    f = factorize(H)
    pruned_only = sparsegpt(W, f, 0.5, blocksize=16)
    res = sparsegpt(W, f, 0.5, blocksize=16, quant=spec)
    groups = torch.arange(48) // (spec.groupsize or 48)
    assert res.scales.shape == (16, spec.n_groups(48)) and res.zeros.shape == (16, spec.n_groups(48))
    on_grid(res.weight, res.scales, res.zeros, spec, groups)
    assert int((res.weight == 0).sum()) >= 16 * 48 // 2
    assert pruned_only.scales is None


def test_error_ordering_sparsegpt_wanda_magnitude():
    W, X, H = problem(64, 128, seed=1)
    f = factorize(H)
    errors = [output_error(W, r.weight, X) for r in (sparsegpt(W, f, 0.5), wanda(W, f, 0.5), magnitude(W, 0.5))]
    assert errors[0] < errors[1] < errors[2], errors


def test_sparsegpt_dead_columns_are_zeroed():
    W, _, H = problem(8, 32, dead=(3, 30))
    f = factorize(H)
    for res in (sparsegpt(W, f, 0.5), sparsegpt(W, f, 0.0), sparsegpt(W, f, 0.5, quant=QuantSpec())):
        assert bool((res.weight[:, [3, 30]] == 0).all())
        assert bool(torch.isfinite(res.weight).all())


def test_sparsegpt_sparsity_zero_returns_w():
    W, _, H = problem(8, 32)
    res = sparsegpt(W, factorize(H), 0.0)
    assert torch.equal(res.weight, W) and res.loss == 0.0


def test_sparsegpt_keeps_shape_dtype_and_does_not_mutate():
    W, _, H = problem(16, 40)
    W = W.to(torch.bfloat16)
    f = factorize(H)
    W_before, U_before = W.clone(), f.U.clone()
    res = sparsegpt(W, f, 0.5, blocksize=16, quant=QuantSpec())
    assert res.weight.shape == W.shape and res.weight.dtype == torch.bfloat16 and res.weight.is_contiguous()
    assert torch.equal(W, W_before) and torch.equal(f.U, U_before)
    assert int((res.weight == 0).sum()) >= 16 * 20


def test_sparsegpt_is_deterministic():
    W, _, H = problem(32, 200)
    f = factorize(H)
    for kwargs in (dict(), dict(prunen=2, prunem=4), dict(quant=QuantSpec(groupsize=64))):
        a = sparsegpt(W, f, 0.5, **kwargs)
        b = sparsegpt(W, f, 0.5, **kwargs)
        assert torch.equal(a.weight, b.weight) and a.loss == b.loss


@pytest.mark.parametrize(
    "sparsities, kwargs",
    [
        ([0.5] * 3, dict()),
        ([0.3, 0.0, 0.8], dict()),
        ([0.5] * 3, dict(prunen=2, prunem=4)),
        ([0.6, 0.5, 0.4], dict(quant=QuantSpec(bits=4, groupsize=32))),
    ],
)
def test_sparsegpt_many_equals_separate_calls(sparsities, kwargs):
    """Also across the two forms: the 48 rows swept together take the classic form (U), each
    matrix alone the deferred one."""
    assert sweep._classic_form_is_cheaper(96, 48, 48) and not sweep._classic_form_is_cheaper(96, 24, 48)
    _, _, H = problem(1, 96)
    f = factorize(H)
    g = torch.Generator().manual_seed(5)
    Ws = [torch.randn(rows, 96, generator=g) * scale for rows, scale in ((24, 1.0), (8, 3.0), (16, 0.1))]
    together = sparsegpt_many(Ws, f, sparsities, blocksize=48, **kwargs)
    for W, p, res in zip(Ws, sparsities, together):
        alone = sparsegpt(W, f, p, blocksize=48, **kwargs)
        assert torch.equal(res.weight == 0, alone.weight == 0)
        assert torch.allclose(res.weight, alone.weight, atol=1e-6, rtol=1e-5)
        assert math.isclose(res.loss, alone.loss, rel_tol=1e-5)


# --- gptq ----------------------------------------------------------------------------------


def rtn(W: Tensor, spec: QuantSpec) -> Tensor:
    """Round to nearest on the same grids (no error compensation)."""
    gs = spec.groupsize or W.shape[1]
    parts = []
    for g in range(0, W.shape[1], gs):
        scale, zero = spec.grid(W[:, g : g + gs])
        parts.append(spec.quantize(W[:, g : g + gs], scale[:, None], zero[:, None]))
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4),
        QuantSpec(bits=3, groupsize=32),
        QuantSpec(bits=4, sym=True, groupsize=48),
        QuantSpec(bits=4, act_order=True),
        QuantSpec(bits=3, groupsize=32, act_order=True),
    ],
)
def test_gptq_on_grid_and_better_than_round_to_nearest(spec):
    W, X, H = problem(32, 128, seed=2)
    res = gptq(W, H, spec, blocksize=48)
    groups = torch.arange(128) // (spec.groupsize or 128)
    on_grid(res.weight, res.scales, res.zeros, spec, groups)
    assert output_error(W, res.weight, X) < output_error(W, rtn(W, spec), X)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4), QuantSpec(bits=4, groupsize=32, mse=True),
                                  QuantSpec(bits=8, sym=True, groupsize=48), QuantSpec(bits=3, groupsize=40)])
def test_rtn_kernel_is_rounding_to_each_groups_own_grid(spec):
    """kernels.rtn (all groups at once) gives the group-by-group reference bit for bit, its
    grids hold the result, it keeps exact zeros, and GPTQ beats it on the output error."""
    W, X, H = problem(32, 128, seed=8)
    W = magnitude(W, 0.5).weight
    res = kernels_rtn(W, spec)
    assert torch.equal(res.weight, rtn(W, spec))
    gs = spec.groupsize or 128
    on_grid(res.weight, res.scales, res.zeros, spec, torch.arange(128) // gs)
    assert bool((res.weight[W == 0] == 0).all())
    assert math.isclose(res.loss, float((W - res.weight).pow(2).sum()) / 2, rel_tol=1e-6)
    assert output_error(W, gptq(W, H, spec).weight, X) < output_error(W, res.weight, X)


@pytest.mark.parametrize("keep_zeros", [True, False])
@pytest.mark.parametrize("spec", [QuantSpec(bits=4, groupsize=24), QuantSpec(bits=3)])
def test_gptq_keep_zeros_equals_eager_column_loop(spec, keep_zeros):
    W, _, H = problem(24, 64, seed=4)
    W = magnitude(W, 0.5).weight
    res = gptq(W, H, spec, blocksize=16, keep_zeros=keep_zeros)
    expected, loss = eager_reference(W, factorize(H).U, fixed=W == 0 if keep_zeros else None, spec=spec)
    if keep_zeros:
        assert bool((res.weight[W == 0] == 0).all())
    assert float(torch.isclose(res.weight.double(), expected, atol=1e-4, rtol=1e-4).float().mean()) > 0.99
    assert math.isclose(res.loss, loss, rel_tol=1e-3)


def test_gptq_keep_zeros_after_sparsegpt_and_act_order():
    W, X, H = problem(32, 96, seed=6)
    pruned = sparsegpt(W, factorize(H), 0.6).weight
    for spec in (QuantSpec(bits=4, groupsize=32), QuantSpec(bits=4, groupsize=32, act_order=True)):
        res = gptq(pruned, H, spec)
        assert bool((res.weight[pruned == 0] == 0).all())
        on_grid(res.weight, res.scales, res.zeros, spec, torch.arange(96) // 32)
        assert output_error(pruned, res.weight, X) < output_error(pruned, rtn(pruned, spec), X)
    loose = gptq(pruned, H, QuantSpec(bits=4), keep_zeros=False)
    assert int((loose.weight == 0).sum()) < int((pruned == 0).sum())


def test_mse_grid_clips_heavy_tails_and_never_does_worse_than_min_max():
    """The searched range contains 0 (zeros stay exactly zero), is never worse than min-max in the
    |x - q|^2.4 error it minimises, and on heavy-tailed rows (Student t, 3 dof) shrinks the range
    for clearly less error."""
    torch.manual_seed(3)
    W = torch.distributions.StudentT(3.0).sample((64, 128))
    W[:, ::3] = 0.0
    for sym in (False, True):
        plain, searched = QuantSpec(bits=4, sym=sym), QuantSpec(bits=4, sym=sym, mse=True)
        errors = []
        for spec in (plain, searched):
            scale, zero = spec.grid(W)
            Q = spec.quantize(W, scale[:, None], zero[:, None])
            on_grid(Q, scale[:, None], zero[:, None], spec, torch.zeros(128, dtype=torch.long))
            assert bool((Q[W == 0] == 0).all())
            errors.append((Q - W).abs().pow(2.4).sum(dim=1))
        assert bool((errors[1] <= errors[0] * (1 + 1e-6)).all())
        assert float(errors[1].sum()) < 0.95 * float(errors[0].sum())
        assert float(searched.grid(W)[0].mean()) < float(plain.grid(W)[0].mean())


@pytest.mark.parametrize("sym", [False, True])
def test_mse_grid_on_a_pruned_w_is_the_whole_tensor_search_bit_for_bit(sym):
    """On a mostly-zero W only the survivors are quantized in the search; the grids must equal
    those of the plain search over the whole tensor (GPTQ's loop, written out here) exactly."""
    torch.manual_seed(5)
    W = torch.distributions.StudentT(3.0).sample((96, 64))
    W[torch.rand(96, 64) < 0.7] = 0.0
    W[7] = 0.0  # an all-zero row
    spec = QuantSpec(bits=3, sym=sym, mse=True)
    xmin, xmax = W.amin(dim=1).clamp(max=0), W.amax(dim=1).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = xmax == xmin
    xmin, xmax = xmin.masked_fill(empty, -1.0), xmax.masked_fill(empty, 1.0)
    best = torch.full((96,), float("inf"))
    scale = zero = None
    for i in range(80):
        p = 1 - i / 100
        s = ((p * xmax - p * xmin) / spec.maxq).clamp(min=torch.finfo(torch.float32).tiny)
        z = torch.full_like(s, 4.0) if sym else torch.round(-(p * xmin) / s)
        err = (spec.quantize(W, s[:, None], z[:, None]) - W).abs().pow(2.4).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale = s if scale is None else torch.where(better, s, scale)
        zero = z if zero is None else torch.where(better, z, zero)
    for view in (W, W.T.contiguous().T):  # the sweep passes transposed views
        got = spec.grid(view)
        assert torch.equal(got[0], scale) and torch.equal(got[1], zero)


@pytest.mark.parametrize("sparse", [False, True])
def test_mse_grid_in_row_chunks_is_the_grid_of_all_rows_bit_for_bit(sparse, monkeypatch):
    """The mse search runs on chunks of rows (for cache locality): every row's grid is the one
    the whole matrix gives it, dense or mostly zeros (the search's two paths)."""
    from prunekit.kernels import quant

    torch.manual_seed(9)
    W = torch.distributions.StudentT(3.0).sample((50, 64))
    if sparse:
        W[torch.rand(50, 64) < 0.7] = 0.0
    spec = QuantSpec(bits=4, mse=True)
    whole = spec.grid(W)
    monkeypatch.setattr(quant, "_MSE_ROWS", 7)
    chunked = spec.grid(W)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


@pytest.mark.parametrize("sym,mse,cols", [(False, True, 96), (True, True, 80), (False, False, 96)])
def test_group_grids_are_each_groups_own_grid_bit_for_bit(sym, mse, cols):
    """The batched grids of all groups (GPTQ's static groups) equal one `grid` call per group,
    a narrower last group (80 = 32 + 32 + 16) included."""
    torch.manual_seed(6)
    W = torch.distributions.StudentT(3.0).sample((40, cols))
    W[torch.rand(40, cols) < 0.7] = 0.0
    spec = QuantSpec(bits=4, sym=sym, mse=mse, groupsize=32)
    scales, zeros = spec.group_grids(W)
    assert scales.shape == zeros.shape == (spec.n_groups(cols), 40)
    for g, start in enumerate(range(0, cols, 32)):
        s, z = spec.grid(W[:, start : start + 32])
        assert torch.equal(scales[g], s) and torch.equal(zeros[g], z), g


def test_mse_grid_through_gptq_and_joint_sparsegpt_stays_on_grid_and_sparse():
    W, X, H = problem(32, 96, seed=6)
    spec = QuantSpec(bits=4, groupsize=32, mse=True)
    groups = torch.arange(96) // 32
    joint = sparsegpt(W, factorize(H), 0.6, quant=spec)
    on_grid(joint.weight, joint.scales, joint.zeros, spec, groups)
    assert float((joint.weight == 0).float().mean()) >= 0.6
    pruned = sparsegpt(W, factorize(H), 0.6).weight
    res = gptq(pruned, H, spec)
    on_grid(res.weight, res.scales, res.zeros, spec, groups)
    assert bool((res.weight[pruned == 0] == 0).all())


def test_gptq_act_order_uses_static_groups_of_original_columns():
    W, _, H = problem(8, 64, seed=8)
    spec = QuantSpec(bits=4, groupsize=16, act_order=True)
    res = gptq(W, H, spec)
    for g in range(4):
        scale, zero = spec.grid(W[:, 16 * g : 16 * (g + 1)])
        assert torch.equal(res.scales[:, g], scale) and torch.equal(res.zeros[:, g], zero)


def test_gptq_dead_columns_deterministic_and_pure():
    W, _, H = problem(8, 40, dead=(0, 7))
    W_before, H_before = W.clone(), H.clone()
    a = gptq(W, H, QuantSpec(bits=4, groupsize=8, act_order=True))
    b = gptq(W, H, QuantSpec(bits=4, groupsize=8, act_order=True))
    assert torch.equal(a.weight, b.weight) and a.loss == b.loss
    assert bool((a.weight[:, [0, 7]] == 0).all())
    assert torch.equal(W, W_before) and torch.equal(H, H_before)


# --- wanda / magnitude ---------------------------------------------------------------------


def test_wanda_prunes_smallest_scores_per_row_and_reports_loss():
    W, _, H = problem(12, 40)
    f = factorize(H)
    res = wanda(W, f, 0.25)
    scores = W.abs() * H.diagonal().sqrt()
    kept_min = scores.masked_fill(res.weight == 0, float("inf")).amin(dim=1)
    pruned_max = scores.masked_fill(res.weight != 0, float("-inf")).amax(dim=1)
    assert bool((pruned_max <= kept_min).all())
    assert bool(((res.weight == 0).sum(dim=1) == 10).all())
    mask = res.weight == 0
    assert math.isclose(res.loss, float((W**2 / f.U.diagonal() ** 2)[mask].sum()) / 2, rel_tol=1e-5)
    from_diag = wanda(W, H.diagonal(), 0.25)
    assert torch.equal(from_diag.weight, res.weight)
    assert math.isclose(from_diag.loss, float((W**2 * H.diagonal())[mask].sum()) / 2, rel_tol=1e-5)


def test_magnitude_global_and_n_of_m():
    W, _, _ = problem(16, 32)
    W_before = W.clone()
    res = magnitude(W, 0.7)
    assert int((res.weight == 0).sum()) == round(0.7 * W.numel())
    assert float(W.abs()[res.weight == 0].max()) <= float(W.abs()[res.weight != 0].min())
    assert math.isclose(res.loss, float((W**2)[res.weight == 0].sum()) / 2, rel_tol=1e-5)
    nm = magnitude(W, 0.5, prunen=2, prunem=4)
    assert bool(((nm.weight == 0).reshape(16, 8, 4).sum(dim=2) == 2).all())
    wnm = wanda(W, torch.ones(32), 0, prunen=4, prunem=8)
    assert bool(((wnm.weight == 0).reshape(16, 4, 8).sum(dim=2) == 4).all())
    assert torch.equal(W, W_before)


def test_ties_are_broken_by_position_with_exact_counts():
    W = torch.ones(4, 8)
    res = magnitude(W, 0.5)
    assert int((res.weight == 0).sum()) == 16
    assert bool((res.weight[:2] == 0).all()) and bool((res.weight[2:] == 1).all())
    nm = magnitude(W, 0.5, prunen=2, prunem=4)
    assert torch.equal(nm.weight[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))


def test_sparsity_zero_is_identity_for_scoring_kernels():
    W, _, H = problem(8, 16)
    assert torch.equal(magnitude(W, 0.0).weight, W)
    assert torch.equal(wanda(W, factorize(H), 0.0).weight, W)


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda W, f, H: sparsegpt(W, f, 1.0),
        lambda W, f, H: sparsegpt(W, f, -0.1),
        lambda W, f, H: sparsegpt(W, f, 0.5, prunen=4, prunem=4),
        lambda W, f, H: sparsegpt(W, f, 0.5, prunen=2, prunem=0),
        lambda W, f, H: sparsegpt(W, f, 0.7, prunen=2, prunem=4),
        lambda W, f, H: sparsegpt(W, f, 0.0, prunen=2, prunem=4, blocksize=6),
        lambda W, f, H: sparsegpt(W, f, 0.0, prunen=2, prunem=5),
        lambda W, f, H: sparsegpt(W, f, 0.5, blocksize=0),
        lambda W, f, H: sparsegpt(W[:, :16], f, 0.5),
        lambda W, f, H: sparsegpt(W[0], f, 0.5),
        lambda W, f, H: sparsegpt(W.masked_fill(W > 2, float("nan")), f, 0.5),
        lambda W, f, H: sparsegpt(W, H, 0.5),
        lambda W, f, H: sparsegpt(W, f, 0.5, quant=QuantSpec(act_order=True)),
        lambda W, f, H: sparsegpt_many([], f, 0.5),
        lambda W, f, H: sparsegpt_many([W, W], f, [0.5]),
        lambda W, f, H: sparsegpt_many([W, W], f, [0.5, 1.0]),
        lambda W, f, H: gptq(W, H[:16, :16], QuantSpec()),
        lambda W, f, H: gptq(W, H, 4),
        lambda W, f, H: gptq(W, H, QuantSpec(), blocksize=-1),
        lambda W, f, H: wanda(W, torch.ones(16), 0.5),
        lambda W, f, H: wanda(W, -torch.ones(32), 0.5),
        lambda W, f, H: magnitude(W, 1.5),
        lambda W, f, H: magnitude(W.long(), 0.5),
        lambda W, f, H: QuantSpec(bits=1),
        lambda W, f, H: QuantSpec(bits=9),
        lambda W, f, H: QuantSpec(groupsize=0),
    ],
)
def test_invalid_arguments_raise_value_error(call):
    W, _, H = problem(8, 32)
    with pytest.raises(ValueError):
        call(W, factorize(H), H)


def test_hessian_factor_type_is_exported():
    _, _, H = problem(2, 8)
    assert isinstance(factorize(H), HessianFactor)


# --- CUDA ----------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_matches_cpu():
    W, _, H = problem(64, 200, seed=9)
    f_cpu = factorize(H)
    f_gpu = factorize(H.cuda())
    assert f_gpu.U.is_cuda
    for kwargs in (dict(), dict(prunen=2, prunem=4), dict(quant=QuantSpec(groupsize=64))):
        cpu = sparsegpt(W, f_cpu, 0.5, **kwargs)
        gpu = sparsegpt(W.cuda(), f_gpu, 0.5, **kwargs)
        assert gpu.weight.is_cuda
        agree = float(((gpu.weight.cpu() == 0) == (cpu.weight == 0)).float().mean())
        assert agree > 0.99 and math.isclose(gpu.loss, cpu.loss, rel_tol=1e-2)
    q = gptq(W.cuda(), H.cuda(), QuantSpec(bits=4, groupsize=64, act_order=True))
    assert q.weight.is_cuda and q.scales.is_cuda
    assert wanda(W.cuda(), f_gpu, 0.5).weight.is_cuda and magnitude(W.cuda(), 0.5).weight.is_cuda


def test_head_grid_search_follows_quantize_mse_unless_the_head_says_otherwise(tiny_models):
    """quantize.head.mse: null takes quantize.mse; false gives the head min-max grids, whose
    sum |w - q|^2.4 is never below the searched grids' (the full range is one of the candidates)."""
    from prunekit.compression.quantize import quantize_head
    from prunekit.config import HeadQuantParams, QuantizeParams
    from prunekit.models import load_model

    model = load_model(str(tiny_models["llama"]))
    head = model.get_output_embeddings().weight
    head.data[:, 3] *= 8  # heavy-tailed columns: the searched range pays
    results = {}
    for name, quant_mse, head_mse in (("follows", True, None), ("searched", True, True), ("min-max", True, False),
                                      ("both off", False, None)):
        params = QuantizeParams(bits=3, groupsize=32, mse=quant_mse,
                                head=HeadQuantParams(bits=3, method="rtn", mse=head_mse))
        results[name] = quantize_head(model, [], params).weight
    error = {k: (w - head.data).abs().pow(2.4).sum().item() for k, w in results.items()}
    assert torch.equal(results["follows"], results["searched"])
    assert torch.equal(results["min-max"], results["both off"])
    assert error["searched"] < error["min-max"]


_FIRST_COS = """
import torch
{imports}
inv = 1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64)
table = torch.outer(torch.arange(128).float(), inv)
first = table.cos()                 # 2 threads: 4 chunks of 2,048 elements
torch.set_num_threads(1)
print(torch.equal(first, table.cos()))
"""


@pytest.mark.skipif(torch.get_num_threads() < 2 or not torch.backends.mkl.is_available(), reason="needs MKL and 2 threads")
def test_first_vml_call_of_a_process_is_exact_after_import():
    """A process's first multi-threaded cos (a rotary table) equals the single-threaded one
    once prunekit.models (what every stage with a model imports) is imported (prunekit/vml.py); without the warm-up about 1 process
    in 4 differed on this machine, so 8 processes catch its loss with probability ~0.9."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="2")
    procs = [subprocess.Popen([sys.executable, "-c", _FIRST_COS.format(imports="import prunekit.models")],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(8)]
    outs = [p.communicate()[0].strip() for p in procs]
    assert outs == ["True"] * 8, outs
