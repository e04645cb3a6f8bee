"""Types of mlxcy.train.optim (optim.pyx): optimizers over lists of Arrays,
gradient clipping and learning-rate schedules."""
from collections.abc import Callable, Mapping
from typing import Any

from typing_extensions import disjoint_base

from mlxcy.core import Array

__all__ = ["Optimizer", "Adam", "AdamW", "SGD", "constant_schedule", "linear_schedule",
           "cosine_schedule", "make_schedule", "clip_grad_norm", "global_norm"]

# A learning rate: a number, or a schedule (update number -> learning rate).
_LearningRate = float | Callable[[int], float]

@disjoint_base
class Optimizer:
    """Base class: holds the step count, the schedule and the state."""

    learning_rate: _LearningRate
    weight_decay: float
    def __init__(self, learning_rate: _LearningRate = 0.001, weight_decay: float = 0.0) -> None: ...
    @property
    def step(self) -> int:
        """Updates applied so far."""
    @property
    def lr(self) -> float:
        """The learning rate of the next update."""
    def lr_at(self, step: int) -> float:
        """The learning rate used by update number `step` (0-based)."""
    def update(self, params: list[Array], grads: list[Array]) -> list[Array]:
        """One step: returns the new parameters and advances the optimizer's state."""
    def state_dict(self) -> dict[str, Any]:
        """{'step': int, 'm': [Array], 'v': [Array]} (for checkpoints)."""
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
    def reset(self) -> None: ...

@disjoint_base
class Adam(Optimizer):
    """Adam; weight_decay here is decoupled as in AdamW (0 by default)."""

    beta1: float
    beta2: float
    eps: float
    bias_correction: bool
    def __init__(
        self,
        learning_rate: _LearningRate = 0.001,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-08,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
    ) -> None: ...

class AdamW(Adam):
    """AdamW: decoupled weight decay (default 0.01), bias-corrected moments."""

    def __init__(
        self,
        learning_rate: _LearningRate = 0.001,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-08,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
    ) -> None: ...

@disjoint_base
class SGD(Optimizer):
    """SGD with optional momentum / dampening / Nesterov and L2 weight decay."""

    momentum: float
    dampening: float
    nesterov: bool
    def __init__(
        self,
        learning_rate: _LearningRate = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
    ) -> None: ...

def clip_grad_norm(grads: list[Array], max_norm: float) -> tuple[list[Array], Array | float]:
    """(clipped grads, norm before clipping): torch.nn.utils.clip_grad_norm_'s rule."""
def global_norm(grads: list[Array]) -> Array | float: ...
def constant_schedule(lr: float, warmup: int = 0, warmup_init: float = 0.0) -> Callable[[int], float]: ...
def linear_schedule(
    lr: float, steps: int, end: float = 0.0, warmup: int = 0, warmup_init: float = 0.0
) -> Callable[[int], float]: ...
def cosine_schedule(
    lr: float, steps: int, end: float = 0.0, warmup: int = 0, warmup_init: float = 0.0
) -> Callable[[int], float]: ...
def make_schedule(
    name: str | None,
    lr: float,
    steps: int | None = None,
    warmup: int = 0,
    end: float = 0.0,
    warmup_init: float = 0.0,
) -> Callable[[int], float]:
    """By name: 'constant', 'linear' or 'cosine' (steps = total updates, warmup included)."""
