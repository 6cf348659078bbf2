"""The OBS column sweep that SparseGPT and GPTQ share.

Columns j = 0..d_in-1 of W are visited left to right. Column j, with current values w, gets
new values q (0 where pruned, the grid value where quantized, w otherwise) at the OBS cost
(w - q)^2 / U_jj^2 = ((w - q) · r_j)^2, and SparseGPT moves every later column k by
-(w - q) / U_jj · U_jk (U = chol(H^-1, upper)), which re-fits all still free columns
optimally given the ones already fixed. The "current values" of the free columns after
columns < a are fixed (to Q, from the original W0) are therefore the least-squares re-fit

    W_F = W0_F + Δ_S H_SF H_FF^-1 = W0_F + (Δ_S T_SF) T_FF^-1,     Δ = W0 - Q, S = [0, a),

using H = T diag(r)^2 T^T from hessian.py. The sweep keeps the columns after the current
block in the form V_F = W0_F + Δ_S T_SF, which is one GEMM per block to maintain (no inverse
of H is needed), and turns a block into current values with its own small triangular
factor, W_B = W0_B + (V_B - W0_B) T_BB^-1, when the block is reached. Inside the block the
classic update with U_BB = diag(r_B)^-1 T_BB^-1 is used: column j moves column k of the
block by -(w_j - q_j) · (T_BB^-1)_jk.

For pruning alone of matrices wide in d_out (d_in^2 < 6 · blocksize · d_out, such as q/k/v or
gate/up swept together), the paper's own form is cheaper: U = (T diag(r))^-1 is formed once
(d_in^3 / 3 flops) and a block's errors reach all later columns at once,
W_F -= (E_B diag(r_B)) U_BF, so no block conversions (2 · blocksize · d_in · d_out flops in
all) and no copy of W0 are needed. Quantization keeps the deferred form: its group grids read
current values of columns ahead of the sweep, which that form provides.

Where the time goes, and how it is avoided:
* Column j's update of all later columns is a rank-1 (BLAS2) update; done eagerly it dominates
  the run time and is memory bound. Updates are applied lazily at two levels instead: eagerly
  inside an inner block of `_INNER` columns, with one GEMM per inner block to the rest of the
  outer block (`blocksize` columns; its start is where SparseGPT chooses its mask), and with
  one GEMM per outer block to all later columns.
* The work is done on W^T (d_in, d_out), so that a column of W is one contiguous row.
* A column costs two tensor operations and no slicing: the inner-block update uses the
  strictly upper part of the diagonal block for the whole inner block (rows <= j receive
  exact zeros), and the views are made once.
* Masks are float 0/1 tensors (bool arithmetic is several times slower on CPU) chosen by
  selection, not sorting.
* On a GPU the per-column loop is bound by kernel launches, not arithmetic. When every entry
  of an inner block is known to be pruned or kept (unstructured masks, chosen at the block
  start, and fixed masks; not N:M or quantization, which decide column by column), the rows
  of W are independent and the block is solved for all rows at once: row w of W, pruned set
  D_m = diag(m), has errors e with e (I + N D_m) = w D_m, N the strictly upper part of the
  inner block's T^-1 (the column loop is forward substitution in exactly this system), one
  batched unit-triangular solve instead of two launches per column.
* On a CPU the same case (masks known at the block start), and N:M (masks chosen row by row),
  is one call per block into a small compiled C kernel (native.py), which runs the column loop
  on vector tiles of rows of W with no per-column dispatch (bit for bit the eager column loop
  within the block); unstructured masks are chosen by compiled radix selection. Without a C
  compiler the PyTorch code runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from prunekit.kernels import native
from prunekit.kernels.hessian import HessianFactor
from prunekit.kernels.masks import count_to_prune, smallest
from prunekit.kernels.quant import QuantSpec

# Columns per inner block: large enough that the GEMMs dominate, small enough that the eager
# rank-1 updates (inner_block x d_out each) stay in cache.
_INNER = 16
# Inner block of the all-rows-at-once solve, and the most bytes its batched (rows, w, w)
# triangular systems may take at once.
_BATCHED_INNER = 128
_BATCHED_BYTES = 1 << 28


def obs_sweep(
    Wt: Tensor,
    factor: HessianFactor,
    *,
    blocksize: int,
    segments: Sequence[tuple[int, int, float]] = (),
    prunen: int = 0,
    prunem: int = 0,
    fixed_mask: Tensor | None = None,
    quant: QuantSpec | None = None,
    static_grid: tuple[Tensor, Tensor, list[int]] | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Run the sweep in place on Wt = W^T (d_in, R), fp32 contiguous, on factor's device.

    Which entries are pruned (exactly one source is used):
      fixed_mask (d_in, R) bool: pruned from the start (GPTQ keeping earlier zeros);
      prunem > 0: in each row of W, the prunen of every prunem columns with the smallest OBS
        cost (w · r_j)^2, chosen when the first of those columns is reached;
      segments [(r0, r1, sparsity), ...]: for each range r0..r1-1 of W^T's columns (one per
        original matrix when several matrices sharing a Hessian are swept together), at the
        start of every block of `blocksize` columns the round(sparsity · numel) entries of
        the range in the block with the smallest (w · r_j)^2.
    With `quant`, the surviving entries are quantized: by `static_grid` = (scales (G, R),
    zeros (G, R), group of each column) when given, else by a grid per group of
    quant.groupsize columns (one group when None), computed when the group's first column is
    reached from the group's current values, with entries already known to be pruned excluded.

    Returns (sum over columns of err^2 for every row of W (R,) fp64, scales (G, R), zeros (G, R));
    the grids are None without `quant`.
    """
    n, R = Wt.shape
    T, r = factor.T, factor.r
    r2 = r.square()
    # With a block's mask known at its start, its rows are independent: solved all at once on a
    # GPU, by the compiled block kernel on the CPU (which also chooses N:M masks row by row).
    known_masks = quant is None and not prunem
    compiled_selection = not Wt.is_cuda and native.available()
    compiled = quant is None and compiled_selection and native.handles_pattern(prunem)
    all_rows = known_masks and _solve_all_rows_at_once(Wt)
    inner = min(_BATCHED_INNER, blocksize) if all_rows else _inner_size(blocksize, prunem)
    # Classic form (eager updates through U, no deferred form) where U costs less than the
    # block conversions it saves; not with quantization, whose group grids read the deferred form.
    U = factor.U if quant is None and _classic_form_is_cheaper(n, R, blocksize) else None
    row_loss = torch.zeros(R, dtype=torch.float64, device=Wt.device)
    W0 = Wt.clone() if U is None else None
    width = min(blocksize, n)
    E_buf = Wt.new_empty(width, R)  # w_j - q_j of the current block
    # Float 0/1, 1 = pruned. Zeroed once: a block's selections overwrite their ranges and ranges
    # at sparsity 0 are never written.
    mask_buf = Wt.new_zeros(width, R)
    scratch = Wt.new_empty(width, R)
    fixed = fixed_mask.to(Wt.dtype) if fixed_mask is not None else None
    # Views for the column loop, made once: creating a view costs about as much as a small
    # tensor operation.
    column_loop = not compiled and not all_rows
    w_rows, err_rows, mask_rows = (_rows(x) for x in (Wt, E_buf, mask_buf)) if column_loop else ([], [], [])

    dynamic_grid = quant is not None and static_grid is None
    if quant is None:
        scale_t = zero_t = None
    elif static_grid is not None:
        scale_t, zero_t, col_group = static_grid
    else:
        groupsize = quant.groupsize or n
        scale_t = Wt.new_empty(quant.n_groups(n), R)
        zero_t = Wt.new_empty(quant.n_groups(n), R)
        col_group = [j // groupsize for j in range(n)]
        V_buf = Wt.new_empty(width, R)

    for a in range(0, n, blocksize):
        b = min(a + blocksize, n)
        block, E, mask = Wt[a:b], E_buf[: b - a], mask_buf[: b - a]
        if U is not None:
            # (T_BB)^-1 = diag(r_B) U_BB: the block's rows of U scaled to a unit diagonal.
            T_inv = torch.mul(U[a:b, a:b], r[a:b, None])
        else:
            # Inverse of the block's diagonal block of T (solving with a contiguous copy is faster).
            eye = torch.eye(b - a, dtype=T.dtype, device=T.device)
            T_inv = torch.linalg.solve_triangular(T[a:b, a:b].contiguous(), eye, upper=True, unitriangular=True)
        if dynamic_grid:
            V = V_buf[: b - a]
            V.copy_(block)
        if a > 0 and U is None:
            # Deferred form -> current values: W_B = W0_B + (V_B - W0_B) T_BB^-1 (transposed here).
            diff = torch.sub(block, W0[a:b], out=scratch[: b - a])
            torch.addmm(W0[a:b], T_inv.T, diff, out=block)

        if fixed is not None:
            mask.copy_(fixed[a:b])
        elif prunem:
            if not compiled:  # the compiled kernel chooses N:M masks itself and does not read these
                mask.zero_()  # groups not reached yet must read as kept (a group grid looks ahead)
        else:
            for r0, r1, sparsity in segments:
                if sparsity > 0:
                    k = count_to_prune(sparsity, (b - a) * (r1 - r0))
                    if compiled_selection:
                        native.smallest_scores(block[:, r0:r1], r2[a:b], k, out=mask[:, r0:r1])
                    else:
                        smallest(block[:, r0:r1].square().mul_(r2[a:b, None]), k, out=mask[:, r0:r1])

        if compiled:
            # Reads T_inv's strictly upper part only; the pruned entries become exactly 0.
            native.masked_block(block, mask, T_inv, E, r2=r2[a:b], prunen=prunen, prunem=prunem)
        else:
            strict = T_inv.triu(1)
            for c in range(a, b, inner):
                e = min(c + inner, b)
                W_in = Wt[c:e]
                if all_rows:
                    N = strict[c - a : e - a, c - a : e - a]
                    _masked_errors(W_in, mask[c - a : e - a], N, out=E[c - a : e - a])
                    W_in.addmm_(N.T, E[c - a : e - a], alpha=-1)
                else:
                    u_rows = strict[c - a : e - a, c - a : e - a].unbind(0)
                    for j in range(c, e):
                        if prunem and j % prunem == 0:
                            scores = Wt[j : j + prunem].square().mul_(r2[j : j + prunem, None])
                            smallest(scores, prunen, dim=0, out=mask[j - a : j - a + prunem])
                        w, err = w_rows[j], err_rows[j - a]
                        if quant is None:
                            torch.mul(w, mask_rows[j - a], out=err)
                        else:
                            g = col_group[j]
                            if dynamic_grid and (j == 0 or col_group[j - 1] != g):
                                hi = min(j + (quant.groupsize or n), n)
                                values = _group_values(Wt, W0, T, V, j, hi, a=a, b=b)
                                # Entries already known to be pruned must not widen the grid.
                                top = min(hi, b)
                                _zero_where(values[: top - j], mask[j - a : top - a])
                                if fixed is not None and hi > b:
                                    _zero_where(values[b - j :], fixed[b:hi])
                                scale_t[g], zero_t[g] = quant.grid(values.T)
                            q = _zero_where(quant.quantize(w, scale_t[g], zero_t[g]), mask_rows[j - a])
                            torch.sub(w, q, out=err)
                            w.copy_(q)
                        if j + 1 < e:
                            W_in.addr_(u_rows[j - c], err, alpha=-1)
                if e < b:
                    Wt[e:b].addmm_(T_inv[c - a : e - a, e - a :].T, E[c - a : e - a], alpha=-1)

            if quant is None:
                _zero_where(block, mask)  # survivors keep their values
        scaled = torch.mul(E, r[a:b, None], out=scratch[: b - a])  # (w_j - q_j) / U_jj
        if b < n and U is not None:
            Wt[b:].addmm_(U[a:b, b:].T, scaled, alpha=-1)
        row_loss += scaled.square_().sum(dim=0)
        if b < n and U is None:
            delta = torch.sub(W0[a:b], block, out=scratch[: b - a])
            Wt[b:].addmm_(T[a:b, b:].T, delta)
    return row_loss, scale_t, zero_t


def _classic_form_is_cheaper(n: int, R: int, blocksize: int) -> bool:
    """Whether U = (T diag(r))^-1 (about n^3 / 3 flops) costs less than the deferred form's
    block conversions (2 · blocksize · n · R flops), i.e. for matrices wide in R."""
    return n * n < 6 * blocksize * R


def _solve_all_rows_at_once(Wt: Tensor) -> bool:
    """Whether inner blocks with known masks are solved for all rows at once (on GPUs, where
    the column loop is launch bound; on the CPU the loop, compiled or not, is faster)."""
    return Wt.is_cuda


def _masked_errors(W_in: Tensor, mask: Tensor, N: Tensor, *, out: Tensor) -> Tensor:
    """Errors of an inner block (w, R) whose float 0/1 `mask` (w, R) is known, for all rows.

    For row x of W (column x of W_in), with m its mask: e_j = m_j (w_j - sum_{i<j} e_i N_ij),
    the column loop's recurrence, i.e. e (I + N D_m) = w D_m: a unit upper-triangular system
    per row, solved batched in chunks of rows. Unpruned entries get exactly e_j = 0.
    """
    w, R = W_in.shape
    chunk = max(1, _BATCHED_BYTES // (w * w * W_in.element_size()))
    for x0 in range(0, R, chunk):
        m = mask[:, x0 : x0 + chunk].T
        A = N.unsqueeze(0) * m.unsqueeze(1)  # (rows, w, w): N_ij m_j; the unit diagonal is implied
        B = torch.mul(W_in[:, x0 : x0 + chunk].T, m).unsqueeze(1)
        errors = torch.linalg.solve_triangular(A, B, upper=True, left=False, unitriangular=True)
        out[:, x0 : x0 + chunk] = errors.squeeze(1).T
    return out


def _zero_where(x: Tensor, mask: Tensor) -> Tensor:
    """x = 0 where the float 0/1 mask is 1, in place: x - x·1 is exactly +0, x - x·0 is x."""
    return x.addcmul_(x, mask, value=-1)


def _rows(x: Tensor) -> list[Tensor]:
    """The rows of x as views (indexing is cheaper than Tensor.unbind for many rows)."""
    return [x[i] for i in range(x.shape[0])]


def _inner_size(blocksize: int, prunem: int) -> int:
    """Inner block length: a multiple of prunem (N:M groups must not straddle it), <= blocksize."""
    inner = _INNER if not prunem else max(prunem, _INNER // prunem * prunem)
    return min(inner, blocksize)


def _group_values(Wt: Tensor, W0: Tensor, T: Tensor, V: Tensor, lo: int, hi: int, *, a: int, b: int) -> Tensor:
    """Current values (as rows of a new (hi-lo, R) tensor) of columns lo..hi-1 once every column
    before lo is fixed, while the sweep stands at column lo of the block a..b-1.

    V holds the block's columns in the deferred form of the block start (later columns are
    still in it, in Wt); adding the block's fixed columns a..lo-1 gives the deferred form for
    S = [0, lo), which the range's own triangular factor turns into current values.
    """
    deferred = torch.cat([V[lo - a : hi - a], Wt[max(b, lo) : hi]]) if hi > b else V[lo - a : hi - a].clone()
    if lo > a:
        deferred.addmm_(T[a:lo, lo:hi].T, W0[a:lo] - Wt[a:lo])
    diff = deferred.sub_(W0[lo:hi])
    solved = torch.linalg.solve_triangular(T[lo:hi, lo:hi].T, diff, upper=False, unitriangular=True)
    return solved.add_(W0[lo:hi])
