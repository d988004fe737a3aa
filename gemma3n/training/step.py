"""The train state and the jitted train and eval steps.

One step: for each micro-batch (gradient accumulation), rebuild the model's params from the
trainable and frozen trees (`ParamSplit.combine`), cast them to the compute dtype (bfloat16
compute; the trainable tree and its gradient stay float32), run the model on the inputs its
keys name in the context `{'batch': micro_batch}` (`gemma3n.training.keys`), and add up the
masked token losses and their gradient; then divide by the whole batch's count of target
tokens (exactly the gradient of the batch's mean loss), clip, and apply the optimizer.

Example:
    >>> steps = TrainSteps(model, FullFineTuning(), optimizer_config.make())
    >>> state = steps.init(trainable, seed=0)
    >>> state, metrics = steps.train(state, frozen, batch)   # batch fields [K, B/K, ...]
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from gemma3n.training.keys import get_by_path, model_inputs
from gemma3n.training.loss import masked_loss_sum
from gemma3n.training.param_split import ParamSplit, cast_floating

# Where the loss finds its targets and mask in the context (the data pipeline's names).
TARGET_KEY, LOSS_MASK_KEY = 'batch.target', 'batch.loss_mask'
DROPOUT_RNG = 'dropout'


class TrainState(flax.struct.PyTreeNode):
    """step: int32 scalar; trainable: float32 tree; opt_state: the optimizer's; rng: uint32
    key data (a raw array, so checkpoints store it as numbers)."""
    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array


class TrainSteps:
    """The jitted steps of training `model` with `split` and `optimizer`.

    The batch dtype of the model (`model.dtype`) is the compute dtype.
    """

    def __init__(self, model: Any, split: ParamSplit, optimizer: optax.GradientTransformation):
        self.model, self.split, self.optimizer = model, split, optimizer
        self.train = jax.jit(self._train, donate_argnums=0)
        self.eval = jax.jit(self._loss_sums)
        self.gradients = jax.jit(self._gradients)

    def init(self, trainable: Any, seed: int) -> TrainState:
        trainable = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trainable)
        return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                          opt_state=self.optimizer.init(trainable),
                          rng=jax.random.key_data(jax.random.key(seed)))

    def _loss_sums(self, trainable: Any, frozen: Any, batch: dict[str, jax.Array],
                   rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(sum of the masked token losses, their count) of one batch [B, ...]."""
        params = cast_floating(self.split.combine(trainable, frozen), self.model.dtype)
        context = {'batch': batch}
        rngs = None if rng is None else {DROPOUT_RNG: jax.random.wrap_key_data(rng)}
        logits = self.model.apply({'params': params}, **model_inputs(self.model, context),
                                  rngs=rngs).logits
        return masked_loss_sum(logits, get_by_path(context, TARGET_KEY),
                               get_by_path(context, LOSS_MASK_KEY))

    def _gradients(self, trainable: Any, frozen: Any, batch: dict[str, jax.Array],
                   rng: jax.Array) -> tuple[Any, jax.Array, jax.Array]:
        """(gradient of the mean loss, the mean loss, the number of target tokens) of a batch
        of K micro-batches (fields [K, B/K, ...]), accumulated one micro-batch at a time."""
        grad_fn = jax.value_and_grad(self._loss_sums, has_aux=True)

        def accumulate(carry, micro):
            grads, loss, count = carry
            micro_batch, micro_rng = micro
            (micro_loss, micro_count), micro_grads = grad_fn(
                trainable, frozen, micro_batch, jax.random.key_data(micro_rng))
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            return (grads, loss + micro_loss, count + micro_count), None

        micro_steps = jax.tree.leaves(batch)[0].shape[0]
        zeros = jax.tree.map(jnp.zeros_like, trainable)
        (grads, loss, count), _ = jax.lax.scan(
            accumulate, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
            (batch, jax.random.split(jax.random.wrap_key_data(rng), micro_steps)))
        scale = 1.0 / jnp.maximum(count, 1.0)
        return jax.tree.map(lambda g: g * scale, grads), loss * scale, count

    def _train(self, state: TrainState, frozen: Any,
               batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        """batch: fields [K, B/K, ...], K micro-batches. Returns the new state and the metrics
        loss (mean over target tokens), tokens (targets counted) and grad_norm."""
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        grads, loss, count = self._gradients(state.trainable, frozen, batch,
                                             jax.random.key_data(step_rng))
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        new_state = TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                               rng=jax.random.key_data(rng))
        return new_state, {'loss': loss, 'tokens': count, 'grad_norm': optax.global_norm(grads)}
