"""The optimiser: AdamW, linear warm-up then cosine decay, global-norm gradient clipping."""
from __future__ import annotations

import dataclasses

import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_frac: float = 0.1          # of the steps, linear from 0
    final_lr_frac: float = 0.0        # cosine decays to lr * this
    clip_norm: float = 1.0            # global-norm clipping (None: off)

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {self.clip_norm}")


def schedule(oc: OptimConfig, steps: int) -> optax.Schedule:
    """Learning rate per optimizer step (0-based)."""
    warm = int(round(oc.warmup_frac * steps))
    return optax.warmup_cosine_decay_schedule(0.0, oc.lr, warm, max(steps, warm + 1), oc.lr * oc.final_lr_frac)


def adamw(oc: OptimConfig, steps: int) -> optax.GradientTransformation:
    clip = [optax.clip_by_global_norm(oc.clip_norm)] if oc.clip_norm is not None else []
    return optax.chain(*clip, optax.adamw(schedule(oc, steps), weight_decay=oc.weight_decay))
