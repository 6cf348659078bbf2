"""Sparsity allocation: how much of each linear to prune.

- `estimate`: the paper's layer-local loss estimates from rows of chol(H⁻¹), over a sparsity grid.
- `schedule`: allocators on those estimates (uniform, the paper's log-loss K-means, OWL).
- `sensitivity`: measured output sensitivity of blocks, and the ranked allocator on it.
- `search`: the project's evolutionary search of per-linear levels scored end to end.
"""
