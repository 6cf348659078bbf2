"""One module per dvc.yaml stage (`prunekit stage <name>` runs it): check(params), needs(paths),
run(params, step). Stages call the library and never import each other (common.py and making.py
are what they share; check.py runs every stage's check); `flows` runs them."""

STAGES = ("check", "prepare_model", "calibrate", "hessians", "estimate", "sensitivity", "schedule", "prune", "quantize",
          "baseline", "export", "evaluate", "report")  # dvc.yaml's order
