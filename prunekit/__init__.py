"""prunekit: post-training pruning and quantization of causal LMs with Hessian-based,
layer-wise sparsity schedules.

The library (kernels, model adapters, layer-wise runner, Hessian store, estimates, schedules,
evaluation) knows nothing of DVC or Prefect; `stages/` and `flows/` are the edges around it.
"""
