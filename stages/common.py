"""What every stage shares: artifact paths (mirroring dvc.yaml) and opening its inputs.

A stage module is `check(params)` (refuse bad parameters before anything runs), `needs(paths)`
(the input artifacts it reads) and `run(params, step)` (params in, library call, outs out);
`flows.pipeline` runs it as a Prefect flow, `prunekit stage <name>` from the command line.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from prunekit.artifacts import read_json
from prunekit.config import ConfigError, Params
from prunekit.forward.sources import LayerSource, open_source

log = logging.getLogger("stages")

# The models the evaluate stage scores (dvc.yaml's foreach): the dense model, the two baselines
# (the dense model quantized alone; uniform pruning at the same sparsity), the scheduled pruned
# model and the compressed one (pruned + quantized).
VARIANTS = ("dense", "quantized", "uniform", "pruned", "compressed")
BASELINES = ("uniform", "quantized")  # made by the baseline stage


@dataclass(frozen=True)
class Paths:
    """Every artifact of a run; the same templates as the outs in dvc.yaml."""

    model: Path
    calib: Path
    eval_tokens: Path
    hessians: Path
    estimates: Path
    sensitivity: Path
    schedule: Path
    pruned: Path
    compressed: Path
    uniform: Path
    quantized: Path
    export: Path
    reports: Path
    checked: Path

    @classmethod
    def of(cls, params: Params, root: Path | None = None) -> "Paths":
        """Paths under `root` (default: the working directory, where DVC runs every stage)."""
        root = Path.cwd() if root is None else root
        m, c = params.model.name, params.calibration.name
        data = root / "data"
        return cls(
            model=data / "models" / m,
            calib=data / "calib" / f"{m}__{c}.parquet",
            eval_tokens=data / "calib" / f"{m}__eval.parquet",
            hessians=data / "hessians" / f"{m}__{c}.zarr",
            estimates=data / "estimates" / f"{m}.parquet",
            sensitivity=data / "sensitivity" / f"{m}__{c}.parquet",
            schedule=data / "schedule" / f"{m}.json",
            pruned=data / "pruned" / m,
            compressed=data / "compressed" / m,
            uniform=data / "uniform" / m,
            quantized=data / "quantized" / m,
            export=data / "export" / m,
            reports=root / "reports",
            checked=data / "params.checked",
        )

    def model_dir(self, which: str) -> Path:
        dirs = dict(zip(VARIANTS, (self.model, self.quantized, self.uniform, self.pruned, self.compressed)))
        if which not in dirs:
            raise ConfigError(f"unknown model variant {which!r}; one of {', '.join(dirs)}")
        return dirs[which]


def model_fingerprint(model_dir: Path) -> str:
    """The fingerprint prepare_model recorded for the dense weights."""
    meta = model_dir / "prunekit.json"
    if not meta.is_file():
        raise ConfigError(f"{model_dir} is not a prepared model (run the prepare_model stage first)")
    return read_json(meta)["fingerprint"]


def read_artifact(path: Path, stage: str) -> dict:
    """A JSON artifact another stage wrote; unreadable or not JSON -> one line naming that stage."""
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable or not JSON ({type(exc).__name__}); rerun the {stage} stage") from None


def open_model(params: Params, model_dir: Path, device, out_dir: Path | None = None, why: str = "") -> LayerSource:
    """The model in `model_dir` as a layer source: streamed one decoder layer at a time with
    runtime.stream, else in memory; with `out_dir` its `save` publishes the modified model
    there. A stage that must hold the whole model to run it many times says so (`why`) and
    loads it in memory even when the params ask for streaming."""
    stream = params.runtime.stream
    if stream and why:
        log.warning("runtime.stream: %s runs the whole model in memory; for a model larger than memory use "
                    "schedule.allocator uniform, kmeans or owl", why)
        stream = False
    return open_source(model_dir, device, stream=stream, out_dir=out_dir)


class TokenizerFiles:
    """The tokenizer files of a prepared model folder, where a stage saves a tokenizer with its
    output model: `save_pretrained(folder)` copies them as they are (parsing and re-writing a
    262k-token vocabulary costs seconds and gives the same tokenizer)."""

    def __init__(self, model_dir: Path):
        from prunekit.storage.hf_forms import tokenizer_files

        self.files = tokenizer_files(model_dir)

    def save_pretrained(self, folder: Path) -> None:
        from prunekit.storage.hf_forms import copy_files

        copy_files(self.files, Path(folder))


def require(*paths: Path) -> None:
    """Fail before any heavy work when an input artifact is missing."""
    for path in paths:
        if not path.exists():
            raise ConfigError(f"missing input {path} (run the stage that makes it, or `dvc repro`)")
