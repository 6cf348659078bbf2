"""prunekit: post-training pruning and quantization of causal LMs with Hessian-based,
layer-wise sparsity schedules.

The library knows nothing of DVC or Prefect; `stages/` and `flows/` are the edges around it.

- `api`: compress your own model in a few calls (re-exported here).
- `kernels`: SparseGPT, GPTQ, Wanda, magnitude as functions of tensors.
- `forward`: windows run layer by layer, the chunked output head, the one scoring path, and
  layer sources (in memory or streamed).
- `allocation`: loss estimates, schedules (uniform, K-means, OWL), sensitivity, the search.
- `compression`: the layer loops that collect Hessians, prune and quantize.
- `storage`: the zarr Hessian store, safetensors checkpoints, packing, export.
- `reporting`: provenance and audit, plots, the report.
- `config` (params types), `data` (texts, windows), `models` (adapters, the loader).
"""
import importlib

# The API is imported on first use, so that `import prunekit.kernels` (or a stage reading only
# the Hessian store) does not load every sub-package.
_EXPORTS = {name: "prunekit.api" for name in ("calibration", "compress", "dense_hessians", "load", "perplexity",
                                               "prune", "quantize", "save", "schedule", "sparsity_of")}
_EXPORTS.update({name: "prunekit.config" for name in ("Params", "PruneParams", "QuantizeParams", "ScheduleParams",
                                                      "SearchParams")})
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")
