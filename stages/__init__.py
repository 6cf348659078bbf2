"""DVC stage entry points: `python -m stages.<name>` for every stage of dvc.yaml."""
