"""Training: the train config, optimizer and LR schedule, the trainer and its resumable state, fine-tuning,
evaluation, and building a run's parts from a recipe."""
