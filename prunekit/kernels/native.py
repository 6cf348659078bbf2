"""The CPU hot spots of sweep.py compiled (native_sweep.c), built on first use.

On a CPU the per-column loop of sweep.py costs two PyTorch operations per column, bound by
their dispatch, not by arithmetic. When a block's mask is known at its start (unstructured
SparseGPT, fixed masks) or depends on each row alone (N:M, groups dividing 16), the whole block
is one call into a small C kernel instead, its column tiles shared out over OpenMP threads.
Built with -fopenmp it needs libgomp.so.1, which PyTorch's Linux builds have already loaded,
so the kernel runs on PyTorch's own thread pool (torch.set_num_threads applies). Threads of
its own would compete with PyTorch's OpenMP workers, which keep spinning for a while after
each operation: on two cores that was slower than one thread. Choosing a block's mask (the k smallest OBS scores) is the second compiled
step: three passes of radix selection instead of about ten tensor operations; the transposes
into and out of the sweep's W^T layout are the third (tiled, threaded); GPTQ's mse grid search
(`QuantSpec` with mse: 80 candidate ranges per row) is the fourth.

The C source is compiled once per process with the system C compiler ($CC, else cc, gcc or
clang) into a temporary file (about 0.25 s; nothing is cached on disk, so a shared home
directory never serves a library built for another CPU). It is built without floating point
contraction, so its results equal the eager column loop's bit for bit and do not depend on
the instruction set or the thread count (the PyTorch path's inner blocks sum in another order:
its results differ in the last bits, which sequential pruning can amplify). Without a
compiler, or with PRUNEKIT_NATIVE=0, the sweep keeps the PyTorch path (slower) and says so
once in the log; provenance records which one ran (`build()`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("native_sweep.c")
_FLAGS = ["-O3", "-ffp-contract=off", "-fPIC", "-shared"]
# Optional flags, most wanted first: a compiler or target without them gets a build without.
_OPTIONAL_FLAGS = (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], [])
# The C kernel's register block (SUB): N:M groups must not straddle it.
_SUB = 16


def available() -> bool:
    """Whether the compiled kernels can be used (compiles them on the first call)."""
    return _library() is not None


def build() -> str | None:
    """The compiler command line the kernels were built with, None when they are not used
    (recorded in provenance: the PyTorch path gives other fp32 rounding)."""
    return _build()[1]



def handles_pattern(prunem: int) -> bool:
    """Whether `masked_block` can choose N:M masks with groups of prunem (0: unstructured)."""
    return prunem == 0 or (prunem <= _SUB and _SUB % prunem == 0)


def masked_block(
    block: Tensor, mask: Tensor, N: Tensor, err: Tensor, *, r2: Tensor | None = None, prunen: int = 0, prunem: int = 0
) -> None:
    """Sweep one block of W^T in place (sweep.py's column loop, compiled).

    block, mask, err: (w, R) fp32 CPU with contiguous rows; mask is 0/1 (1 = pruned). N: (w, w),
    the block's T^-1, of which only the strictly upper part is read. For every column x of block (row of W),
    e_j = m_j w_j, w_j -= e_j, w_k -= N_jk e_j for k > j, in order of j; err receives e (0 where
    kept) and the pruned entries of block become exactly 0. With prunem > 0 the mask is not
    read: prunen of every prunem entries of x are pruned, those with the smallest w^2 · r2_j at
    the moment the group's first entry is reached (ties: lower index), as in the column loop.
    """
    width, R = block.shape
    _check_rows(block, mask, err, shape=(width, R))
    if N.shape != (width, width) or N.dtype != torch.float32 or N.device.type != "cpu":
        raise ValueError(f"N must be ({width}, {width}) fp32 on the CPU, got {tuple(N.shape)} {N.dtype} {N.device}")
    if prunem and (not handles_pattern(prunem) or width % prunem or not 0 < prunen < prunem):
        raise ValueError(f"cannot sweep {prunen}:{prunem} groups in a block of {width} columns")
    if prunem and (r2 is None or r2.shape != (width,) or r2.dtype != torch.float32):
        raise ValueError(f"an N:M sweep needs r2 of shape ({width},) fp32")
    L = N.T.contiguous()  # row k: the coefficients column k receives
    r2 = r2.contiguous() if prunem else None

    code = _loaded().prunekit_masked_block(
        block.data_ptr(), block.stride(0), mask.data_ptr(), mask.stride(0), err.data_ptr(), err.stride(0),
        L.data_ptr(), r2.data_ptr() if prunem else None, prunen, prunem, width, R,
    )
    if code != 0:
        raise MemoryError("the native sweep kernel could not allocate its work buffer")


def smallest_scores(block: Tensor, r2: Tensor, k: int, *, out: Tensor) -> Tensor:
    """Float 0/1 mask of the k smallest OBS scores (w · r_j)^2 = w^2 · r2_j of the block (w, R),
    into `out` (w, R); ties: lower flat position first. Equals `masks.smallest` on
    block.square() * r2[:, None] (same scores, same rule), computed by radix selection on the
    scores' bit patterns in three passes instead of about ten tensor operations.

    block, out: fp32 CPU with contiguous rows; r2: (w,) fp32.
    """
    width, R = block.shape
    if k <= 0 or k >= width * R:
        return out.fill_(float(k > 0))
    _check_rows(block, out, shape=(width, R))
    r2 = r2.contiguous()
    if r2.shape != (width,) or r2.dtype != torch.float32:
        raise ValueError(f"r2 must be ({width},) fp32, got {tuple(r2.shape)} {r2.dtype}")
    code = _loaded().prunekit_smallest_scores(
        block.data_ptr(), block.stride(0), r2.data_ptr(), width, R, k, out.data_ptr(), out.stride(0)
    )
    if code != 0:
        raise MemoryError("the native mask selection could not allocate its buffers")
    return out


def mse_grid(W: Tensor, xmin: Tensor, xmax: Tensor, *, maxq: int, sym_zero: float | None, steps: int,
             tiny: float) -> tuple[Tensor, Tensor]:
    """GPTQ's mse grid search of `QuantSpec.grid` for every row of W (rows, cols) with range
    [xmin, xmax] (rows,): the range factor p = 1, 0.99, ... (`steps` of them) with the least
    sum |q(x) - x|^2.4, ties to the larger p; sym_zero: the zero point of a symmetric grid, None
    for asymmetric. Returns (scale, zero), (rows,) fp32.

    The quantization of each x is QuantSpec.quantize's, operation for operation; the errors are
    summed in another order and |e|^2.4 is computed to about 3e-7 relative (PyTorch: its pow),
    so where two ranges' errors agree to about 1e-6 the other one can win. One pass per range
    over the row's nonzeros, in cache, stopped once its error passes the best one's, instead of
    10 tensor passes per range: about 3.4x faster on 2 cores (benchmarks/bench_mse_grid.py).
    """
    rows, cols = W.shape
    _check_rows(W, shape=(rows, cols))
    xmin, xmax = xmin.to(torch.float32).contiguous(), xmax.to(torch.float32).contiguous()
    if xmin.shape != (rows,) or xmax.shape != (rows,):
        raise ValueError(f"xmin and xmax must be ({rows},), got {tuple(xmin.shape)} {tuple(xmax.shape)}")
    scale, zero = torch.empty(rows), torch.empty(rows)
    code = _loaded().prunekit_mse_grid(W.data_ptr(), W.stride(0), rows, cols, xmin.data_ptr(), xmax.data_ptr(),
                                       float(maxq), -1.0 if sym_zero is None else float(sym_zero), steps, tiny,
                                       scale.data_ptr(), zero.data_ptr())
    if code != 0:
        raise MemoryError("the native mse grid search could not allocate its buffers")
    return scale, zero


def transpose(src: Tensor, out: Tensor | None = None) -> Tensor:
    """out = src^T for a 2-D src; compiled (about 3x PyTorch's transposing copy, threaded) for
    fp32 CPU tensors with contiguous rows when the kernels are available, else `out.copy_(src.T)`
    (which also converts dtypes). Returns out (a new contiguous tensor when None)."""
    rows, cols = src.shape
    if out is None:
        out = torch.empty(cols, rows, dtype=src.dtype, device=src.device)
    if out.shape != (cols, rows):
        raise ValueError(f"out must be ({cols}, {rows}), got {tuple(out.shape)}")
    fast = src.dtype == out.dtype == torch.float32 and src.device.type == out.device.type == "cpu"
    if fast and src.stride(1) == 1 and out.stride(1) == 1 and available():
        _loaded().prunekit_transpose(src.data_ptr(), src.stride(0), out.data_ptr(), out.stride(0), rows, cols)
        return out
    return out.copy_(src.T)


def _check_rows(*tensors: Tensor, shape: tuple[int, int]) -> None:
    for x in tensors:
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape != shape or x.stride(1) != 1:
            raise ValueError(f"expected {shape} fp32 CPU tensors with contiguous rows, got {tuple(x.shape)} "
                             f"{x.dtype} {x.device} strides {x.stride()}")


def _library() -> ctypes.CDLL | None:
    return _build()[0]


def _loaded() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("the native CPU kernels are not available (see prunekit.kernels.native.available())")
    return lib


@functools.cache
def _build() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get("PRUNEKIT_NATIVE", "1") == "0":
        log.info("PRUNEKIT_NATIVE=0: the sweep uses its PyTorch path on the CPU")
        return None, None
    compiler = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if compiler is None:
        log.warning("no C compiler found: the sweep uses its PyTorch path on the CPU (slower)")
        return None, None
    with tempfile.TemporaryDirectory(prefix="prunekit-native-", ignore_cleanup_errors=True) as tmp:
        library = Path(tmp) / "native_sweep.so"
        errors = ""
        for optional in _OPTIONAL_FLAGS:
            flags = [*optional, *_FLAGS]
            try:
                done = subprocess.run(
                    [compiler, *flags, str(_SOURCE), "-o", str(library)], capture_output=True, text=True, timeout=120
                )
            except (OSError, subprocess.TimeoutExpired) as e:
                errors = str(e)
                break
            if done.returncode == 0:
                errors = ""
                break
            errors = done.stderr.strip()
        lib = None
        if not errors:
            try:
                lib = ctypes.CDLL(str(library))
            except OSError as e:
                errors = str(e)
    if lib is None:
        log.warning(
            "could not build the native sweep kernels with %s (%s): the sweep uses its PyTorch path on the CPU",
            compiler, errors.splitlines()[-1] if errors else "no output",
        )
        return None, None
    log.info("built the native sweep kernels: %s %s", compiler, " ".join(flags))
    size, ptr = ctypes.c_ssize_t, ctypes.c_void_p
    lib.prunekit_masked_block.argtypes = [
        ptr, size, ptr, size, ptr, size, ptr, ptr, ctypes.c_int, ctypes.c_int, ctypes.c_int, size
    ]
    lib.prunekit_masked_block.restype = ctypes.c_int
    lib.prunekit_smallest_scores.argtypes = [ptr, size, ptr, ctypes.c_int, size, size, ptr, size]
    lib.prunekit_smallest_scores.restype = ctypes.c_int
    lib.prunekit_transpose.argtypes = [ptr, size, ptr, size, size, size]
    lib.prunekit_transpose.restype = None
    flt = ctypes.c_float
    lib.prunekit_mse_grid.argtypes = [ptr, size, size, size, ptr, ptr, flt, flt, ctypes.c_int, flt, ptr, ptr]
    lib.prunekit_mse_grid.restype = ctypes.c_int
    return lib, " ".join([compiler, *flags])
