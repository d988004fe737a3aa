"""Test helper, run as a subprocess by tests/test_sharding.py: a small model on simulated devices.

Not a test module. The device count must be set before JAX starts, hence a process of its own:
    python tests/sharding_worker.py meshes OUT.npz                  # 8 devices, every mesh
    python tests/sharding_worker.py process OUT.npz ADDRESS N I     # one of N processes, 2 devices
Results go to OUT.npz (arrays and numbers, compared by the tests).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

MESH_DEVICES = 8
PROCESS_DEVICES = 2
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_'
                           f'device_count={MESH_DEVICES if sys.argv[1] == "meshes" else PROCESS_DEVICES}')
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from gemma3n import layout, sharding  # noqa: E402
from gemma3n.checkpoints import save_params  # noqa: E402
from gemma3n.config import TransformerConfig  # noqa: E402
from gemma3n.layers import axes  # noqa: E402
from gemma3n.schema import model_schema  # noqa: E402
from gemma3n.text.sampler import Sampler  # noqa: E402
from gemma3n.engine.sampling import Greedy  # noqa: E402
from gemma3n.transformer import Gemma3nTransformer  # noqa: E402

# Every mechanism of the architecture at a size that compiles in seconds: 8 query heads (split
# by tensor=8), 2 K/V heads (not split by tensor=4 or 8), a vocabulary of 516 rows (split by 2
# and 4, not by 8: tensor=8 replicates it, fsdp=4 x tensor=2 falls back to tensor alone).
CONFIG = TransformerConfig.gemma3n(
    num_layers=5, num_shared_layers=2, num_sparse_layers=1, embed_dim=64, hidden_dim=256,
    num_heads=8, num_kv_heads=2, head_dim=16, num_embed=516, per_layer_input_dim=8,
    laurel_rank=8, sliding_window_size=16)
# Every weight is split where its rules allow, however small (the default keeps small ones whole).
RULES = sharding.ShardingRules(min_size=0)
MESHES = ('data=8', 'data=2,tensor=4', 'fsdp=4,tensor=2', 'tensor=8')
PROCESS_MESH = 'data=2,tensor=2'        # 4 devices: 1 process x 4, or 2 processes x 2
LOAD_MESH = 'fsdp=4,tensor=2'
PROMPTS = [[2, 5, 9, 11, 40], [2, 7, 8], [2, 100, 200, 300], [2, 3],
           [2, 50, 51], [2, 9, 9, 9, 9, 9], [2, 400], [2, 13, 14, 15]]
NEW_TOKENS = 4
CACHE_LENGTH = 32                        # beyond the sliding window of 16
TRAIN_LENGTH = 12
SEED = 1
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')


def model_and_params():
    model = Gemma3nTransformer(config=CONFIG, text_only=True, dtype=jnp.float32)
    tokens = jnp.ones((1, 1), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(SEED), tokens)['params']
    return model, params, model_schema(model)


def generate(model, params, mesh=None):
    sampler = Sampler(model=model, params=params, cache_length=CACHE_LENGTH, sharding_rules=RULES,
                      mesh=mesh)
    out = sampler.sample_tokens(PROMPTS, NEW_TOKENS, return_logits=True)
    return sampler, out.tokens, out.logits


def train_batch():
    rng = np.random.default_rng(SEED)
    tokens = rng.integers(1, CONFIG.num_embed, (len(PROMPTS), TRAIN_LENGTH + 1)).astype(np.int32)
    tokens[:2, -3:] = 0                   # padding, masked out of the loss
    return tokens


def train_step_fn(model, on_mesh, shardings):
    """A minimal AdamW step of next-token cross-entropy, (new params, loss, grads), and the
    optimizer's init; with `shardings` (the params'), the new params and the optimizer's
    moments are pinned to them, as a sharded train step keeps its state in place."""
    optimizer = optax.adamw(1e-3)

    def pin(tree):
        return tree if shardings is None else jax.tree.map(
            jax.lax.with_sharding_constraint, tree, shardings)

    def pin_moments(opt_state):
        adam = opt_state[0]
        return (adam._replace(mu=pin(adam.mu), nu=pin(adam.nu)),) + tuple(opt_state[1:])

    def loss_fn(params, tokens):
        inputs = on_mesh.constrain({'t': tokens[:, :-1]}, {'t': (axes.BATCH, None)})['t']
        logits = model.apply({'params': params}, inputs).logits
        targets = tokens[:, 1:]
        mask = (targets != 0) & (inputs != 0)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(losses * mask) / jnp.sum(mask)

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return pin(optax.apply_updates(params, updates)), pin_moments(opt_state), loss, grads

    return jax.jit(lambda params: pin_moments(optimizer.init(params))), jax.jit(step)


def train(model, params, on_mesh):
    """(loss, grads, whether the updated params and the optimizer's moments kept the params'
    shardings) of one step."""
    shardings = None if on_mesh.mesh is None else jax.tree.map(lambda x: x.sharding, params)
    init, step = train_step_fn(model, on_mesh, shardings)
    opt_state = init(params)
    new_params, opt_state, loss, grads = step(params, opt_state, train_batch())
    if shardings is None:
        return loss, grads, True
    kept = all(a.sharding.is_equivalent_to(s, a.ndim)
               for tree in (new_params, opt_state[0].mu, opt_state[0].nu)
               for a, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)))
    return loss, grads, kept


def max_tree_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def collective_counts(sampler, params):
    """Collectives in the compiled decode step, the largest all-gather's element count, and how
    many all-gathers produce the whole of a split weight (its shape)."""
    engine = sampler.engine
    cache = engine.new_cache(len(PROMPTS), CACHE_LENGTH)
    text = engine._step.lower(params, jnp.zeros(len(PROMPTS), jnp.int32), cache,
                              jax.random.key(0), None, Greedy()).compile().as_text()
    ops = re.findall(r'= (\w+)\[([\d,]*)\]\S* (' + '|'.join(COLLECTIVES) + r')(?:-start)?\(', text)
    counts = {name: sum(1 for *_, op in ops if op == name) for name in COLLECTIVES}
    gathered = [tuple(int(d) for d in dims.split(',') if d) for _, dims, op in ops
                if op == 'all-gather']
    split = {leaf.shape for leaf in jax.tree_util.tree_leaves(params)
             if not leaf.sharding.is_fully_replicated}
    whole = sum(1 for shape in gathered if shape in split)
    return counts, max((int(np.prod(s)) for s in gathered), default=0), whole


def shard_report(params, mesh):
    """{path: (global shape, shape of the shard on the first device)}, and whether every
    device holds 1/n of each weight split n ways by its spec (no more)."""
    flat = {'/'.join(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    shapes = {path: (leaf.shape, leaf.addressable_shards[0].data.shape)
              for path, leaf in flat.items()}
    exact = True
    for leaf in flat.values():
        used = [a for entry in leaf.sharding.spec if entry is not None
                for a in ((entry,) if isinstance(entry, str) else entry)]
        ways = int(np.prod([mesh.shape[a] for a in used]))
        exact &= all(shard.data.nbytes * ways == leaf.nbytes for shard in leaf.addressable_shards)
    return shapes, exact


def load_from_file(model, params, folder, results):
    """Our own file loaded into the serving layout straight into shards (blocks read from the
    file), against the same conversion on one device."""
    mesh = sharding.make_mesh(LOAD_MESH)
    path = folder / 'params.safetensors'
    save_params(params, path)
    _, loaded = layout.load_serving(path, model, mesh=mesh, sharding_rules=RULES, progress=False)
    _, expected = layout.to_serving(model, params, sparse_rows=False)
    results['load/max_diff'] = np.asarray(max_tree_diff(loaded, expected))
    q = loaded['layer_0']['attn']['q_einsum']['w'].value    # stored [N, H, D]: N tensor, D fsdp
    results['load/q_spec'] = np.array([str(entry) for entry in q.sharding.spec])
    results['load/q_shard'] = np.array(q.addressable_shards[0].data.shape)


def run_meshes(out_path):
    model, params, schema = model_and_params()
    results = {}
    _, tokens, logits = generate(model, params)
    loss, grads, _ = train(model, params, sharding.MeshConstraints(None))
    results['tokens'], results['logits'], results['loss'] = tokens, logits, np.asarray(loss)
    for spec in MESHES:
        mesh = sharding.make_mesh(spec)
        placed = sharding.shard_params(params, schema, mesh, RULES)
        sampler, mesh_tokens, mesh_logits = generate(model, placed)
        results[f'{spec}/tokens'], results[f'{spec}/logits'] = mesh_tokens, mesh_logits
        results[f'{spec}/traces'] = np.array([sampler.engine.num_traces['prefill'],
                                              sampler.engine.num_traces['step']])
        mesh_loss, mesh_grads, kept = train(model, placed, sampler.engine.on_mesh)
        results[f'{spec}/loss'] = np.asarray(mesh_loss)
        results[f'{spec}/grads_diff'] = np.asarray(max_tree_diff(grads, mesh_grads))
        results[f'{spec}/train_kept_shardings'] = np.asarray(kept)
        counts, largest_gather, weights_gathered = collective_counts(sampler, placed)
        results[f'{spec}/weights_gathered'] = np.asarray(weights_gathered)
        for name, count in counts.items():
            results[f'{spec}/{name}'] = np.asarray(count)
        results[f'{spec}/largest_gather'] = np.asarray(largest_gather)
        shapes, exact = shard_report(placed, mesh)
        for path, (shape, shard) in shapes.items():
            results[f'{spec}/shape/{path}'] = np.array([shape, shard])
        results[f'{spec}/shares_exact'] = np.asarray(exact)
    load_from_file(model, params, Path(out_path).parent, results)
    # The multi-process comparison: the same mesh on 4 devices of this one process.
    mesh = sharding.make_mesh(PROCESS_MESH, jax.devices()[:4])
    _, results['four/tokens'], results['four/logits'] = generate(
        model, sharding.shard_params(params, schema, mesh, RULES))
    np.savez(out_path, **results)


def run_process(out_path, coordinator, num_processes, process_id):
    sharding.initialize(sharding.ProcessGroup(coordinator, num_processes, process_id),
                        timeout_s=120)
    model, params, schema = model_and_params()
    mesh = sharding.make_mesh(PROCESS_MESH)
    _, tokens, logits = generate(model, sharding.shard_params(params, schema, mesh, RULES))
    np.savez(out_path, tokens=tokens, logits=logits,
             devices=np.array([len(jax.local_devices()), len(jax.devices())]))
    jax.distributed.shutdown()


if __name__ == '__main__':
    if sys.argv[1] == 'meshes':
        run_meshes(sys.argv[2])
    else:
        run_process(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
