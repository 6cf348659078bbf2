"""What every stage shares: artifact paths (mirroring dvc.yaml), loading, and the CLI wrapper."""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from prunekit.artifacts import read_json
from prunekit.config import ConfigError, Params, load_params
from prunekit.hessian_store import StoreError

log = logging.getLogger("stages")


@dataclass(frozen=True)
class Paths:
    """Every artifact of a run; the same templates as the outs in dvc.yaml."""

    model: Path
    calib: Path
    hessians: Path
    estimates: Path
    sensitivity: Path
    schedule: Path
    pruned: Path
    compressed: Path
    export: Path
    reports: Path

    @classmethod
    def of(cls, params: Params, root: Path | None = None) -> "Paths":
        """Paths under `root` (default: the working directory, where DVC runs every stage)."""
        root = Path.cwd() if root is None else root
        m, c = params.model.name, params.calibration.name
        data = root / "data"
        return cls(
            model=data / "models" / m,
            calib=data / "calib" / f"{m}__{c}.parquet",
            hessians=data / "hessians" / f"{m}__{c}.zarr",
            estimates=data / "estimates" / f"{m}.parquet",
            sensitivity=data / "sensitivity" / f"{m}__{c}.parquet",
            schedule=data / "schedule" / f"{m}.json",
            pruned=data / "pruned" / m,
            compressed=data / "compressed" / m,
            export=data / "export" / m,
            reports=root / "reports",
        )

    def model_dir(self, which: str) -> Path:
        dirs = {"dense": self.model, "pruned": self.pruned, "compressed": self.compressed}
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


def open_model(params: Params, model_dir: Path, device, out_dir: Path | None = None):
    """(stream, model, adapter) for a layer loop: the model in memory (stream None), or with
    runtime.stream its meta-device skeleton read one decoder layer at a time (and written to
    out_dir as it goes)."""
    if params.runtime.stream:
        from prunekit.streaming import LayerStream

        stream = LayerStream(model_dir, device, out_dir=out_dir)
        return stream, stream.model, stream.adapter
    return (None, *whole_model(model_dir, device))


def whole_model(model_dir: Path, device, params: Params | None = None, why: str = ""):
    """(model, adapter) in memory. A stage that must run the whole model many times (why) says
    so when the params ask for streaming."""
    from prunekit.models import adapter_for, load_model

    if params is not None and params.runtime.stream:
        log.warning("runtime.stream: %s runs the whole model in memory; for a model larger than memory use "
                    "schedule.allocator uniform, kmeans or owl", why)
    model = load_model(str(model_dir), device=device)
    return model, adapter_for(model)


def layer_runner(stream, model, adapter, windows, device):
    """The calibration windows' layer-by-layer runner, reading streamed layers when streaming."""
    from prunekit.layerwise import LayerwiseRunner

    return stream.runner(windows) if stream is not None else LayerwiseRunner(model, adapter, windows, device)


def save_result(stream, model, tokenizer_dir: Path, out_dir: Path, extra: dict, more_files=None) -> None:
    """Write the modified model with prunekit.json = extra + its "fingerprint" (a stream computes
    the same fingerprint from the files it wrote); `more_files(folder)` adds files before the
    folder is published, so they appear together with the model or not at all."""
    from prunekit.artifacts import state_fingerprint
    from prunekit.models import load_tokenizer, save_model

    tokenizer = load_tokenizer(str(tokenizer_dir))
    if stream is not None:
        stream.save(tokenizer, extra, more_files)
    else:
        save_model(model.cpu(), tokenizer, out_dir, extra={"fingerprint": state_fingerprint(model), **extra},
                   more_files=more_files)


def require(*paths: Path) -> None:
    """Fail before any heavy work when an input artifact is missing."""
    for path in paths:
        if not path.exists():
            raise ConfigError(f"missing input {path} (run the stage that makes it, or `dvc repro`)")


def setup_environment() -> None:
    """Quiet, offline defaults (Prefect state inside the project, no telemetry) and logging."""
    from flows.server import offline_env

    os.environ.update(offline_env())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(name: str, *args: str) -> None:
    """`python -m stages.<name>`: read params.yaml, check it and the stage's inputs, then run
    the stage as a Prefect flow; bad input exits with status 2 and one line, before heavy work."""
    setup_environment()
    try:
        params = load_params("params.yaml")
        from flows.pipeline import run_stage, stage_module

        stage = stage_module(name)
        stage.check(params)
        require(*stage.needs(Paths.of(params), *args))
        run_stage(name, stage.run, params, *args)
    except (ConfigError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
