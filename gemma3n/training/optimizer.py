"""AdamW with a linear warmup and a cosine decay, after clipping the gradient's global norm."""

from __future__ import annotations

import dataclasses

import jax
import optax

# The cosine ends at this fraction of the peak learning rate rather than at 0, so the last
# steps still move the weights.
FINAL_LR_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """learning_rate: the peak, reached after `warmup_steps`, then cosine-decayed until
    `total_steps`; `clip_norm` None: no clipping. Weight decay applies to matrices only
    (not to norm scales)."""
    learning_rate: float
    total_steps: int
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f'the learning rate must be positive, got {self.learning_rate}')
        if self.total_steps < 1:
            raise ValueError(f'the number of steps must be at least 1, got {self.total_steps}')
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f'warmup steps must be in [0, {self.total_steps}) (the number of '
                             f'steps), got {self.warmup_steps}')
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f'the clipping norm must be positive, got {self.clip_norm}')

    def schedule(self) -> optax.Schedule:
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0 if self.warmup_steps else self.learning_rate,
            peak_value=self.learning_rate, warmup_steps=self.warmup_steps,
            decay_steps=self.total_steps, end_value=self.learning_rate * FINAL_LR_FRACTION)

    def make(self) -> optax.GradientTransformation:
        adamw = optax.adamw(self.schedule(), b1=self.b1, b2=self.b2, eps=self.eps,
                            weight_decay=self.weight_decay,
                            mask=lambda tree: jax.tree.map(lambda x: x.ndim > 1, tree))
        if self.clip_norm is None:
            return adamw
        return optax.chain(optax.clip_by_global_norm(self.clip_norm), adamw)
