"""Typed, validated pipeline configuration: the single loader of params.yaml.

Every stage reads its section from here, so a bad value fails once, at the boundary, with one
line that names the key — before any model is loaded.

Example::

    >>> cfg = Params.model_validate({"prune": {"sparsity": 0.7}})
    >>> cfg.prune.sparsity, cfg.calibration.nsamples
    (0.7, 16)

The defaults here are params.yaml's (a test keeps the two equal).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A parameter or input path is invalid; the message is one line meant for the user."""


class NonFiniteError(ConfigError):
    """A loss, weight or Hessian that is NaN or infinite; the message names where it arose, so
    that no stage reports it as a result (the input model or text is usually to blame)."""


def _read_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, EOFError)
    try:
        from safetensors import SafetensorError
    except ImportError:
        return errors
    return (*errors, SafetensorError)


@contextmanager
def reading(what: str) -> Iterator[None]:
    """What goes wrong reading a user's input (a file or folder missing, damaged, truncated or not
    what it claims to be; a hub id that cannot be reached) as one ConfigError line naming `what`
    and the reader's first line of explanation. The original error stays the cause (a debug run
    prints it: PRUNEKIT_DEBUG=1)."""
    try:
        yield
    except ConfigError:
        raise
    except _read_errors() as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"cannot read {what}: {reason}") from exc


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelParams(_Section):
    name: str = Field("gemma3-270m", pattern=r"^[A-Za-z0-9._-]+$")
    # "embedded:gemma3-270m", a local HF folder, a .gguf file, or a hub id (needs network).
    source: str = "embedded:gemma3-270m"


class CalibrationParams(_Section):
    name: str = Field("c4", pattern=r"^[A-Za-z0-9._-]+$")
    # "c4" (documents `c4_docs` of data/c4), "wikitext2-valid", or a path to a plain text file.
    source: str = "c4"
    c4_docs: tuple[int, int] = (1000, 2000)
    nsamples: int = Field(16, gt=0)
    seqlen: int = Field(256, gt=1)
    seed: int = 0

    @field_validator("c4_docs")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] < v[1]:
            raise ValueError("must be [start, stop) with 0 <= start < stop")
        return v


class HessianParams(_Section):
    dtype: Literal["float32", "float64"] = "float32"


class EstimateParams(_Section):
    grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    percdamp: float = Field(0.01, ge=0)
    owl_m: float = Field(5.0, gt=0)

    @field_validator("grid")
    @classmethod
    def _in_unit_interval(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0 <= p < 1 for p in v):
            raise ValueError("every grid sparsity must lie in [0, 1)")
        return tuple(sorted(v))


class SensitivityParams(_Section):
    """Measured output sensitivity of every decoder block (prunekit.sensitivity): Δ calibration
    NLL with that block alone pruned to each grid sparsity. Read by the 'ranked' allocator and
    by the search's ranked start."""

    grid: tuple[float, ...] = (0.8,)
    windows: int = Field(4, ge=1)      # calibration windows scored (full protocol: 16)

    @field_validator("grid")
    @classmethod
    def _in_unit_interval(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0 < p < 1 for p in v):
            raise ValueError("every grid sparsity must lie in (0, 1)")
        return tuple(sorted(v))


class SearchParams(_Section):
    """Evolutionary search of per-unit sparsity levels scored on calibration windows (prunekit.search)."""

    generations: int = Field(3, ge=0)
    offspring: int = Field(6, ge=1)
    survivors: int = Field(2, ge=1)
    max_mutations: int = Field(3, ge=1)
    fit_windows: int = Field(4, ge=1)     # calibration windows scoring a schedule
    screen_windows: int = Field(1, ge=1)  # of those, the ones that screen the children
    step: float = Field(0.05, gt=0, lt=1)  # levels: target ± k·step ...
    span: float = Field(0.1, gt=0, lt=1)  # ... within target ± span and the schedule's bounds
    unit: Literal["block", "linear"] = "linear"
    database: Literal["dense", "sequential"] = "sequential"
    init: Literal["uniform", "ranked"] = "uniform"
    fitness: Literal["nll", "kl"] = "nll"  # calibration NLL, or KL from the dense model's next-token distributions
    # Further rounds (generations each), each with the sequential database rebuilt along the
    # schedule found so far, so the search's scores follow its own pruned prefix again.
    rounds: tuple[int, ...] = ()
    seed: int = 0
    tf32: bool = True  # CUDA: score with TF32 matmuls (a ranking needs no more; pruning is unaffected)

    @field_validator("rounds")
    @classmethod
    def _rounds(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(g < 0 for g in v):
            raise ValueError(f"rounds are generation counts >= 0, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _rounds_need_sequential(self) -> "SearchParams":
        if self.rounds and self.database != "sequential":
            raise ValueError("search rounds rebuild the sequential database: set database: sequential")
        return self


class ScheduleParams(_Section):
    allocator: Literal["uniform", "kmeans", "owl", "ranked", "search"] = "search"
    unit: Literal["block", "linear"] = "block"
    k: int = Field(3, ge=1)
    spread: float = Field(0.05, ge=0, lt=1)
    normalise: Literal["none", "per_param"] = "per_param"
    min_sparsity: float = Field(0.0, ge=0, lt=1)
    max_sparsity: float = Field(0.95, gt=0, lt=1)
    seed: int = 0
    owl_lambda: float = Field(0.08, ge=0, lt=1)
    rank_at: float = Field(0.8, gt=0, lt=1)      # ranked: order blocks by measured Δ at this sparsity
    rank_spread: float = Field(0.2, ge=0, lt=1)  # ranked: least sensitive +spread ... most sensitive −spread
    search: SearchParams = SearchParams()


class PruneParams(_Section):
    method: Literal["sparsegpt", "wanda", "magnitude"] = "sparsegpt"
    sparsity: float = 0.7
    structure: str = "unstructured"
    mode: Literal["sequential", "parallel"] = "sequential"
    blocksize: int = Field(128, ge=1)
    percdamp: float = Field(0.01, ge=0)

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"must lie in [0, 1), got {v}")
        return v

    @field_validator("structure")
    @classmethod
    def _structure(cls, v: str) -> str:
        if v != "unstructured":
            n, sep, m = v.partition(":")
            if sep != ":" or not (n.isdigit() and m.isdigit()) or not 0 < int(n) < int(m):
                raise ValueError(f"must be 'unstructured' or 'N:M' with 0 < N < M, got {v!r}")
        return v

    @property
    def n_m(self) -> tuple[int, int]:
        """(N, M) for N:M sparsity, (0, 0) for unstructured."""
        if self.structure == "unstructured":
            return 0, 0
        n, m = self.structure.split(":")
        return int(n), int(m)


class HeadQuantParams(_Section):
    # The LM head, and the embedding when tied to it (Gemma-3-270M: 262144 x 640, 63% of the
    # weights), on the linears' grid (bits here; groupsize, sym, mse as theirs). null: kept in float.
    bits: int | None = Field(4, ge=2, le=8)
    method: Literal["gptq", "rtn"] = "gptq"  # GPTQ on the head's input Hessian | plain rounding
    mse: bool | None = None  # the grid range search for the head; null: as quantize.mse


class QuantizeParams(_Section):
    enabled: bool = True
    bits: int = Field(4, ge=2, le=8)
    groupsize: int | None = Field(128, ge=1)
    sym: bool = False  # asymmetric min-max grid; True: z = 2^(bits-1), what transformers loads from compressed-tensors
    act_order: bool = True
    mse: bool = True  # grid range searched per row/group for the least |x - q|^2.4 (GPTQ's mse)
    blocksize: int = Field(128, ge=1)
    percdamp: float = Field(0.01, ge=0)
    head: HeadQuantParams = HeadQuantParams()


class EvaluateParams(_Section):
    datasets: tuple[str, ...] = ("wikitext2", "c4")
    seqlen: int = Field(256, gt=1)
    # None = every window of the text (the full protocol); an int caps it for quick CPU runs.
    max_windows: int | None = Field(4, ge=1)


class ExportParams(_Section):
    # The deployable forms' dtype: bf16, in which Gemma-3 and most current models are released
    # (fp16 overflows Gemma's activations); float16 for fp16 models; float32 for the exact weights.
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class RuntimeParams(_Section):
    device: str = "auto"
    # Read one decoder layer at a time from the safetensors files (prunekit/streaming.py) in
    # the hessians, estimate, prune, quantize and evaluate stages: for models larger than
    # memory; same results (perplexities to float rounding). Export always reads by layer.
    stream: bool = False
    # Where submitted per-layer/per-shard tasks run: Prefect's thread pool, its process pool,
    # or Dask (a LocalCluster of `workers` processes, or the scheduler at `dask_address`).
    task_runner: Literal["threads", "processes", "dask"] = "threads"
    workers: int = Field(2, ge=1)
    dask_address: str | None = None
    # Calibration shards per layer for Hessian accumulation (map-reduce); None: 1 with threads,
    # `workers` otherwise. Results equal one shard up to fp rounding.
    hessian_shards: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _runner(self) -> "RuntimeParams":
        if self.dask_address is not None and self.task_runner != "dask":
            raise ValueError("runtime.dask_address needs runtime.task_runner 'dask'")
        return self

    @property
    def shards(self) -> int:
        if self.hessian_shards is not None:
            return self.hessian_shards
        return 1 if self.task_runner == "threads" else self.workers


class Params(_Section):
    model: ModelParams = ModelParams()
    calibration: CalibrationParams = CalibrationParams()
    hessians: HessianParams = HessianParams()
    estimate: EstimateParams = EstimateParams()
    sensitivity: SensitivityParams = SensitivityParams()
    schedule: ScheduleParams = ScheduleParams()
    prune: PruneParams = PruneParams()
    quantize: QuantizeParams = QuantizeParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    runtime: RuntimeParams = RuntimeParams()

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        n, m = self.prune.n_m
        if m and abs(self.prune.sparsity - n / m) > 1e-9:
            raise ValueError(f"prune.structure {n}:{m} means prune.sparsity {n / m:g}, got {self.prune.sparsity}")
        s = self.schedule
        if s.rank_at > max(self.sensitivity.grid):
            raise ValueError(f"schedule.rank_at {s.rank_at} lies beyond the measured sensitivity.grid "
                             f"(largest {max(self.sensitivity.grid)})")
        if s.min_sparsity > s.max_sparsity:
            raise ValueError("schedule.min_sparsity must not exceed schedule.max_sparsity")
        if self.prune.structure == "unstructured" and s.allocator != "uniform":
            if not s.min_sparsity <= self.prune.sparsity <= s.max_sparsity:
                raise ValueError(
                    f"prune.sparsity {self.prune.sparsity} lies outside "
                    f"[schedule.min_sparsity, schedule.max_sparsity]"
                )
        return self


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ConfigError with one readable line on any problem."""
    return validate_params(read_yaml(path), str(path))


def read_yaml(path: str | Path) -> dict:
    """A YAML file's top-level mapping ({} for an empty file); ConfigError with one line if it is
    missing, not YAML or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:  # its str() spans lines; the error must be one
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML: {getattr(exc, 'problem', None) or exc}{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid parameters in {path}: a mapping of sections is needed, got {type(raw).__name__}")
    return raw


def validate_params(raw: dict, source: str) -> Params:
    """Params from a parsed mapping; ConfigError with one line naming the first bad key (and how
    many more there are), or `source` where no key is to blame."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        where = f"invalid parameter {key}" if key else f"invalid parameters in {source}"
        raise ConfigError(f"{where}: {msg}{more}") from None
