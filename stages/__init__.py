"""One module per dvc.yaml stage (`prunekit stage <name>` runs it): check(params), needs(paths),
run(params, step). Stages call the library and never import each other; `flows` runs them."""

STAGES = ("prepare_model", "calibrate", "hessians", "estimate", "sensitivity", "schedule", "prune", "quantize",
          "export", "evaluate", "report")  # dvc.yaml's order
