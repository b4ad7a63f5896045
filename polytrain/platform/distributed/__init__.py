"""Distributed: the DeepSpeed engine (through Accelerate), checkpoints, and the per-rank memory planner."""
