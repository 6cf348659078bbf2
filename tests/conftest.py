from pathlib import Path

import pytest
from tiny import CONFIGS, make_tiny_model, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """One saved tiny random model per supported architecture."""
    base = tmp_path_factory.mktemp("tiny")
    return {mt: make_tiny_model(mt, base / mt, tokenizer_dir) for mt in CONFIGS}


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One loopback Prefect server for the session (the same one `flows.server` gives users)."""
    import os

    from flows.server import prefect_server

    home = tmp_path_factory.mktemp("prefect_home")
    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_LOGGING_TO_API_ENABLED")}
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_LOGGING_TO_API_ENABLED"] = "false"  # nothing left to flush at teardown
    from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    with prefect_server() as url, temporary_settings(updates={PREFECT_API_URL: url,  # in process (read at import)
                                                              PREFECT_LOGGING_TO_API_ENABLED: False}):
        os.environ["PREFECT_API_URL"] = url  # and for the stage processes
        yield url
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def tiny_params(model_dir: Path, **overrides) -> dict:
    """The project's params.yaml, changed for a quick pipeline run on a tiny model."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    quick = {
        "model": {"name": "tiny", "source": str(model_dir)},
        "calibration": {"nsamples": 8, "seqlen": 64},
        "schedule": {"k": 2},
        "quantize": {"groupsize": 32},
        "evaluate": {"seqlen": 64, "max_windows": 4},
        "runtime": {"device": "cpu"},
    }
    for section, values in [*quick.items(), *overrides.items()]:
        params.setdefault(section, {}).update(values)
    return params


def pytest_collection_modifyitems(items):
    """Tests that run stages through DVC or Prefect are the `pipeline` lane (`scripts/test --fast` skips it)."""
    for item in items:
        if "prefect_api" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.pipeline)
