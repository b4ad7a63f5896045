"""Observing a run: the metrics log, W&B and the progress bar, meters, the report, the run-directory layout."""
