"""Everything about training that is not the model, one folder per concept:

data/ (manifests, datasets and their layouts, packing, the data order, the loader, built-in data, prepared
data), observe/ (metrics log and W&B, meters, report, the run-directory layout), distributed/ (the DeepSpeed
engine, checkpoints, ZeRO-3 stand-ins, the memory planner) and train/ (the trainer and its resumable state,
the optimizer step and LR schedule, fine-tuning and the checkpoints it starts from, evaluation, export).
"""
