"""Single-device PyTorch modules. Nothing here imports deepspeed, accelerate, wandb or torch.distributed."""
