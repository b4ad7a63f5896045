"""Everything about training that is not the model, one folder per concept:

data/ (manifests, datasets, packing, the data order, the loader, built-in data), train/ (the train config,
optimizer and LR schedule, the trainer and its resumable state, fine-tuning, evaluation, building a run
from a recipe), distributed/ (the DeepSpeed engine, checkpoints, the memory planner) and observe/ (metrics
log and W&B, meters, report, the run-directory layout).
"""
