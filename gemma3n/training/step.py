"""The train state and the jitted train and eval steps.

One step: for each micro-batch (gradient accumulation), rebuild the model's params from the
trainable and frozen trees (`ParamSplit.combine`), cast them to the compute dtype (bfloat16
compute; the trainable tree and its gradient stay float32), run the model on the inputs its
keys name in the context `{'batch': micro_batch}` (`gemma3n.training.keys`), and add up the
masked token losses and their gradient; then divide by the whole batch's count of target
tokens (exactly the gradient of the batch's mean loss), clip, and apply the optimizer.

On one CPU device a micro-batch of more than `CPU_PASS_TOKENS` tokens runs in passes of whole
rows (`row_passes`), added up like micro-batches: the same sums in another order.

On a device mesh the same jitted functions run sharded (docs/architecture.md §14): `place` puts
the trainable and frozen trees in the shardings the rules give their logical axes (the weight
schema's; for adapters the split's own `trainable_schema`), and inside the step the batch rows
are pinned over `data`/`fsdp`, and the gradient, the updated weights and the optimizer's
moments to the trainable tree's shardings, so the state stays where it is step after step.
Without a mesh those constraints are nothing.

Example:
    >>> steps = TrainSteps(model, FullFineTuning(), optimizer_config.make(), mesh=mesh)
    >>> trainable, frozen = steps.place(*steps.split.split(params))
    >>> state = steps.init(trainable, seed=0)
    >>> state, metrics = steps.train(state, frozen, batch)   # batch fields [K, B/K, ...]
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from gemma3n.checkpoints.flat_params import flatten_params, unflatten_params
from gemma3n.compiler_options import compiler_options
from gemma3n.embedder import EMBEDDING_TABLE_PATH
from gemma3n.layers import axes
from gemma3n.schema import model_schema
from gemma3n.sharding import MeshConstraints, ShardingRules, shard_params
from gemma3n.sharding.params import axis_names
from gemma3n.training.keys import get_by_path, model_inputs
from gemma3n.training.loss import chunked_loss_sums
from gemma3n.training.param_split import ParamSplit, cast_floating

# Where the loss finds its targets and mask in the context (the data pipeline's names).
TARGET_KEY, LOSS_MASK_KEY = 'batch.target', 'batch.loss_mask'
DROPOUT_RNG = 'dropout'
# The one parameter the unembedding reads (the tied table).
EMBEDDER, TABLE = EMBEDDING_TABLE_PATH.split('/')
# Tokens a pass of the model takes at most on one CPU device. A step's elementwise work
# ([tokens, 16384] FFN activations and their gradients at E4B widths) likely runs from cache at
# a few hundred tokens and from memory beyond: a LoRA step of 4 x 512 tokens at E4B widths took
# 65.9 s in one pass and 48.7 s in 4 passes of a row (bench/README.md, "A LoRA step in passes").
CPU_PASS_TOKENS = 512


def row_passes(batch: dict[str, jax.Array], row_tokens: int, pass_tokens: int
               ) -> dict[str, jax.Array]:
    """Fields [K, B, ...] -> [K·S, B/S, ...]: each micro-batch cut into S passes of whole,
    consecutive rows, S the fewest (dividing B) whose passes hold at most `pass_tokens` tokens
    of `row_tokens` a row (one row a pass where no S does)."""
    rows = jax.tree.leaves(batch)[0].shape[1]
    passes = next((s for s in range(1, rows + 1)
                   if rows % s == 0 and rows // s * row_tokens <= pass_tokens), rows)
    return jax.tree.map(lambda x: x.reshape((-1, rows // passes) + x.shape[2:]), batch)


class TrainState(flax.struct.PyTreeNode):
    """step: int32 scalar; trainable: float32 tree; opt_state: the optimizer's; rng: uint32
    key data (a raw array, so checkpoints store it as numbers)."""
    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array


class TrainSteps:
    """The jitted steps of training `model` with `split` and `optimizer`, on `mesh` (None: one
    device) by `rules`.

    The batch dtype of the model (`model.dtype`) is the compute dtype.
    """

    def __init__(self, model: Any, split: ParamSplit, optimizer: optax.GradientTransformation,
                 *, mesh: Mesh | None = None, rules: ShardingRules = ShardingRules(),
                 pass_tokens: int | None = None):
        """pass_tokens: the most tokens a pass of the model takes (`row_passes`); None:
        `CPU_PASS_TOKENS` on one CPU device, a whole micro-batch elsewhere (accelerators, and
        meshes, whose rows are spread over the devices)."""
        self.model, self.split, self.optimizer = model, split, optimizer
        one_cpu = mesh is None and jax.default_backend() == 'cpu'
        self.pass_tokens = pass_tokens or (CPU_PASS_TOKENS if one_cpu else None)
        self.on_mesh = MeshConstraints(mesh, rules)
        self.schema = model_schema(model) if mesh is not None else None
        self.trainable_schema = None if mesh is None else split.trainable_schema(self.schema)
        options = compiler_options(training=True)
        self.train = jax.jit(self._train, donate_argnums=0, compiler_options=options)
        self.eval = jax.jit(self._loss_sums, compiler_options=options)
        self.gradients = jax.jit(self._gradients, compiler_options=options)
        self._init = jax.jit(self._initial_state)

    def place(self, trainable: Any, frozen: Any) -> tuple[Any, Any]:
        """The trees `split` gave, on the device: the frozen one as the split holds it
        (`ParamSplit.hold_frozen`, which may consume it: LoRA's base is re-laid out), each
        weight in its shards on the mesh (read from host memory block by block), or whole on
        the default device without one."""
        frozen = self.split.hold_frozen(self.model, frozen)
        if self.on_mesh.mesh is None:
            return trainable, jax.device_put(frozen)
        rules, mesh = self.on_mesh.rules, self.on_mesh.mesh
        return (shard_params(trainable, self.trainable_schema, mesh, rules),
                shard_params(frozen, self.schema, mesh, rules))

    def init(self, trainable: Any, seed: int) -> TrainState:
        """The state of step 0: `trainable` in float32 and the optimizer's initial state."""
        return self._init(trainable, jax.random.key_data(jax.random.key(seed)))

    def _initial_state(self, trainable: Any, rng: jax.Array) -> TrainState:
        trainable = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trainable)
        shardings = self._shardings(trainable)
        trainable = self._pin(trainable, shardings)
        return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                          opt_state=self._pin_state(self.optimizer.init(trainable), shardings),
                          rng=rng)

    def _shardings(self, trainable: Any) -> Any:
        """Inside jit: the shardings of a tree shaped like the trainable one (None: no mesh)."""
        if self.on_mesh.mesh is None:
            return None
        flat = flatten_params(trainable)
        return unflatten_params({
            path: self.on_mesh.sharding(axis_names(self.trainable_schema[path]), x.shape)
            for path, x in flat.items()})

    def _pin(self, tree: Any, shardings: Any) -> Any:
        """Inside jit: `tree` (shaped like the trainable one) in `shardings`."""
        if shardings is None:
            return tree
        return jax.tree.map(jax.lax.with_sharding_constraint, tree, shardings)

    def _pin_state(self, opt_state: Any, shardings: Any) -> Any:
        """Inside jit: every copy of the trainable tree in the optimizer's state (AdamW's
        moments) in `shardings`; its counters as the compiler places them."""
        if shardings is None:
            return opt_state
        return optax.tree_map_params(self.optimizer, jax.lax.with_sharding_constraint,
                                     opt_state, shardings, transform_non_params=lambda x: x)

    def _loss_sums(self, trainable: Any, frozen: Any, batch: dict[str, jax.Array],
                   rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(sum of the masked token losses, their count) of one batch [B, ...]."""
        # Each device runs its own rows: the batch over data/fsdp.
        batch = self.on_mesh.constrain(
            batch, {name: (axes.BATCH,) + (None,) * (x.ndim - 1) for name, x in batch.items()})
        params = cast_floating(self.split.combine(trainable, frozen), self.model.dtype)
        context = {'batch': batch}
        rngs = None if rng is None else {DROPOUT_RNG: jax.random.wrap_key_data(rng)}
        # The logits, unused here, are left out of the compiled step; the loss unembeds the
        # hidden states a chunk at a time.
        hidden = self.model.apply({'params': params}, **model_inputs(self.model, context),
                                  rngs=rngs, return_hidden_states=True).hidden_states
        head = {EMBEDDER: {TABLE: params[EMBEDDER][TABLE]}}
        return chunked_loss_sums(self._unembed, head, hidden, get_by_path(context, TARGET_KEY),
                                 get_by_path(context, LOSS_MASK_KEY))

    def _unembed(self, head: Any, hidden: jax.Array) -> jax.Array:
        return self.model.apply({'params': head}, hidden, method='unembed', upcast=False)

    def _gradients(self, trainable: Any, frozen: Any, batch: dict[str, jax.Array],
                   rng: jax.Array) -> tuple[Any, jax.Array, jax.Array]:
        """(gradient of the mean loss, the mean loss, the number of target tokens) of a batch
        of K micro-batches (fields [K, B/K, ...]), accumulated one micro-batch (or one pass of
        its rows, `row_passes`) at a time."""
        grad_fn = jax.value_and_grad(self._loss_sums, has_aux=True)
        shardings = self._shardings(trainable)
        if self.pass_tokens is not None:
            row_tokens = math.prod(get_by_path({'batch': batch}, TARGET_KEY).shape[2:])
            batch = row_passes(batch, row_tokens, self.pass_tokens)

        def accumulate(carry, micro):
            grads, loss, count = carry
            micro_batch, micro_rng = micro
            (micro_loss, micro_count), micro_grads = grad_fn(
                trainable, frozen, micro_batch, jax.random.key_data(micro_rng))
            # The sum stays split as the weights are (FSDP: each device its part of it).
            grads = self._pin(jax.tree.map(jnp.add, grads, micro_grads), shardings)
            return (grads, loss + micro_loss, count + micro_count), None

        micro_steps = jax.tree.leaves(batch)[0].shape[0]
        zeros = self._pin(jax.tree.map(jnp.zeros_like, trainable), shardings)
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
        shardings = self._shardings(state.trainable)
        trainable = self._pin(optax.apply_updates(state.trainable, updates), shardings)
        opt_state = self._pin_state(opt_state, shardings)
        new_state = TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                               rng=jax.random.key_data(rng))
        return new_state, {'loss': loss, 'tokens': count, 'grad_norm': optax.global_norm(grads)}
