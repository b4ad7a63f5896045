"""Training: the trainer (assembling what the job hands it) and its resumable state, the optimizer step and LR
schedule, fine-tuning and the checkpoints it starts from, evaluation, generation, export."""
