"""Optimizers, learning-rate schedules and weight decay for the trainer.

Weight decay is applied here rather than by mlx's optimizers so that every
optimizer skips the same parameters (biases and norms, by the precision
module's predicate): decoupled (`p -= lr * wd * p`) for adamw and adafactor,
coupled L2 (`g += wd * p`) for adam and sgd, as in PyTorch.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map, tree_map_with_path

SCHEDULERS = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor")
DECOUPLED = {"adamw": True, "adafactor": True, "adam": False, "sgd": False}


def warmup_steps(total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """Hugging Face's rule: `warmup_steps` wins, else ceil(ratio * total)."""
    if warmup_steps > 0:
        return warmup_steps
    return math.ceil(total_steps * warmup_ratio)


def build_schedule(name: str, learning_rate: float, total_steps: int, warmup: int = 0):
    """lr(step) for step = 0, 1, ... (the number of updates already done).

    Warmup rises linearly from 0 and reaches `learning_rate` at step
    `warmup`; "linear" and "cosine" then decay to 0 at step `total_steps`,
    matching transformers' get_*_schedule_with_warmup.
    """
    warmup = min(warmup, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if name == "linear":
        main = optim.linear_schedule(learning_rate, 0.0, decay_steps)
    elif name == "cosine":
        main = optim.cosine_decay(learning_rate, decay_steps, 0.0)
    elif name == "constant":
        main = lambda step: mx.array(learning_rate, mx.float32)  # noqa: E731
    else:
        raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULERS}")
    if warmup == 0:
        return main
    rise = optim.linear_schedule(0.0, learning_rate, warmup)
    return optim.join_schedules([rise, main], [warmup])


def build_optimizer(name: str, schedule) -> optim.Optimizer:
    """An mlx optimizer without its own weight decay (see `apply_update`)."""
    if name in ("adamw", "adam"):
        # AdamW with decay 0 is Adam; decay is added by `apply_update`.
        return optim.Adam(learning_rate=schedule)
    if name == "sgd":
        return optim.SGD(learning_rate=schedule)
    if name == "adafactor":
        # transformers' settings when a learning rate is given.
        return optim.Adafactor(
            learning_rate=schedule, relative_step=False, scale_parameter=False
        )
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


def decay_mask(model, params: dict) -> dict:
    """A tree like `params` with True where weight decay applies.

    Biases and norm parameters (per `burnish.precision`) are never decayed.
    """
    from .precision import norm_parameter_paths

    norms = norm_parameter_paths(model)

    def decays(path, _):
        return path not in norms and path.split(".")[-1] != "bias"

    return tree_map_with_path(decays, params)


def apply_update(
    optimizer: optim.Optimizer,
    grads: dict,
    params: dict,
    mask: dict,
    weight_decay: float,
    decoupled: bool,
) -> dict:
    """One optimizer step with weight decay on the `mask`ed parameters only."""
    if weight_decay and not decoupled:
        grads = tree_map(
            lambda g, p, m: g + weight_decay * p.astype(g.dtype) if m else g,
            grads, params, mask,
        )
    new = optimizer.apply_gradients(grads, params)
    if weight_decay and decoupled:
        lr = optimizer.learning_rate
        new = tree_map(
            lambda n, p, m: (n - (lr * weight_decay) * p).astype(n.dtype) if m else n,
            new, params, mask,
        )
    return new
