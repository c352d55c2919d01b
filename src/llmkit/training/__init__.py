"""Pre-training and fine-tuning loop and its parts (optimizer, schedule, checkpoints, DDP, metrics)."""
from llmkit.training.config import TrainConfig

__all__ = ["TrainConfig"]
