"""The edges that run the stages: Prefect flows (`pipeline`), one loopback Prefect server for a
whole `dvc repro` (`server`), and the `prunekit` command (`cli`)."""
