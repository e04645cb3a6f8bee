"""LoRA fine-tuning: adapters (lora), optimizers (optim), data, the training
loop (trainer), mlx-lm-compatible adapter files (adapters) and the CLI (cli)."""
from mlxcy.train.lora import LoRA, TrainStep, cross_entropy  # noqa: F401
from mlxcy.train.optim import (AdamW, Adam, SGD, make_schedule,  # noqa: F401
                               clip_grad_norm)
