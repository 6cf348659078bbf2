"""What a run leaves for people: the provenance record and its audit (`provenance`), plots
(`plots`) and the markdown report with runs.csv (`report`)."""
