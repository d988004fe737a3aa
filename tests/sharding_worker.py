"""Test helper, run as a subprocess by tests/test_sharding.py: a small model on simulated devices.

Not a test module. The device count must be set before JAX starts, hence a process of its own:
    python tests/sharding_worker.py meshes OUT_DIR                  # 8 devices, every mesh
    python tests/sharding_worker.py process OUT.npz ADDRESS N I     # one of N processes, 2 devices
`meshes` compares every mesh with one device itself and writes OUT_DIR/report.json (differences,
counts, shard shapes, timings) and OUT_DIR/four.npz (the tokens and logits of 4 devices, which
the processes must reproduce); `process` writes its tokens and logits to OUT.npz.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

MESH_DEVICES = 8
PROCESS_DEVICES = 2
# LLVM's optimisations off: compiling is most of the worker's time and they nearly double it
# (every program compared here is compiled with the same flags).
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_'
                           f'device_count={MESH_DEVICES if sys.argv[1] == "meshes" else PROCESS_DEVICES}'
                           ' --xla_backend_optimization_level=0'
                           ' --xla_llvm_disable_expensive_passes=true')
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import gemma3n  # noqa: E402
from gemma3n import layout, sharding  # noqa: E402
from gemma3n.checkpoints import save_params  # noqa: E402
from gemma3n.checkpoints.hf_export import save_hf  # noqa: E402
from gemma3n.config import AttentionType, TransformerConfig  # noqa: E402
from gemma3n.engine.sampling import Greedy  # noqa: E402
from gemma3n.schema import model_schema  # noqa: E402
from gemma3n.text.sampler import Sampler  # noqa: E402
from gemma3n.training import FullFineTuning, OptimizerConfig, TrainSteps  # noqa: E402
from gemma3n.training.data import Example  # noqa: E402
from gemma3n.training.finetune import MODEL_KEYS  # noqa: E402
from gemma3n.training.lora import LoRA  # noqa: E402
from gemma3n.training.packing import Rows, TooLong  # noqa: E402
from gemma3n.transformer import Gemma3nTransformer  # noqa: E402

# Every mechanism of the architecture at a size that compiles in seconds: a sliding and a
# global layer, a third sharing the first's K/V; 8 query heads (split by tensor=8), 2 K/V heads
# (not split by tensor=4 or 8: the non-dividing case), a vocabulary of 516 rows (split by 2 and
# 4, not by 8: tensor=8 replicates it, fsdp=4 x tensor=2 falls back to tensor alone).
CONFIG = dataclasses.replace(
    TransformerConfig.gemma3n(
        num_layers=3, num_shared_layers=1, num_sparse_layers=1, embed_dim=64, hidden_dim=256,
        num_heads=8, num_kv_heads=2, head_dim=16, num_embed=516, per_layer_input_dim=8,
        laurel_rank=8, sliding_window_size=16),
    attention_types=(AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL,
                     AttentionType.LOCAL_SLIDING))
# Every weight is split where its rules allow, however small (the default keeps small ones whole).
RULES = sharding.ShardingRules(min_size=0)
MESHES = ('data=8', 'data=2,tensor=4', 'fsdp=4,tensor=2', 'tensor=8')
PROCESS_MESH = 'data=2,tensor=2'        # 4 devices: 1 process x 4, or 2 processes x 2
LOAD_MESH = 'fsdp=4,tensor=2'
PROMPTS = [[2, 5, 9, 11, 40], [2, 7, 8], [2, 100, 200, 300], [2, 3],
           [2, 50, 51], [2, 9, 9, 9, 9, 9], [2, 400], [2, 13, 14, 15]]
NEW_TOKENS = 4
CACHE_LENGTH = 32
# The train batch: 2 micro-batches (accumulated by the step's scan) of 8 rows, one per device
# of data=8, of 12 tokens.
MICRO_BATCHES, MICRO_ROWS, TRAIN_LENGTH = 2, 8, 12
# AdamW's first step moves each weight by lr·g/(|g| + eps): with eps = 10·lr the update changes
# by at most a tenth of a change of the gradient (with the default eps 1e-8 a gradient ~1e-8
# off zero, as float32 reordering leaves, would flip a whole lr-sized step).
OPTIMIZER = OptimizerConfig(learning_rate=1e-3, total_steps=1, eps=1e-2, weight_decay=0.01)
LORA_RANK = 4
SEED = 1
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')
# Weights whose shards the test checks (as the rules say for CONFIG).
SHARD_PATHS = ('embedder/input_embedding', 'layer_0/attn/q_einsum/w', 'layer_0/attn/kv_einsum/w',
               'layer_0/mlp/gating_einsum', 'layer_0/mlp/linear', 'final_norm/scale')


def model_and_params():
    model = Gemma3nTransformer(config=CONFIG, text_only=True, dtype=jnp.float32)
    tokens = jnp.ones((1, 1), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(SEED), tokens)['params']
    return model, params, model_schema(model)


def generate(model, params, mesh=None):
    sampler = Sampler(model=model, params=params, cache_length=CACHE_LENGTH, sharding_rules=RULES,
                      mesh=mesh)
    out = sampler.sample_tokens(PROMPTS, NEW_TOKENS, return_logits=True)
    return sampler, np.asarray(out.tokens), np.asarray(out.logits)


def train_batch():
    """fields [MICRO_BATCHES, MICRO_ROWS, TRAIN_LENGTH]: one example per row, of random
    lengths (padding masked out), loss on a random half of the tokens."""
    rng = np.random.default_rng(SEED)
    examples = []
    for _ in range(MICRO_BATCHES * MICRO_ROWS):
        length = int(rng.integers(4, TRAIN_LENGTH + 2))
        examples.append(Example(tokens=rng.integers(1, CONFIG.num_embed, length).astype(np.int32),
                                loss_mask=(rng.random(length) < 0.5) | (np.arange(length) == 1)))
    rows = Rows.from_examples(examples, TRAIN_LENGTH, pack=False, too_long=TooLong.TRUNCATE)
    return rows.batch(np.arange(rows.num_rows).reshape(MICRO_BATCHES, MICRO_ROWS))


def train(model, params, split, mesh=None):
    """One step of the train step `gemma3n finetune` runs: (metrics, the new state's leaves
    (trainable and optimizer state), whether the state kept the trainable tree's shardings)."""
    steps = TrainSteps(model.clone(**MODEL_KEYS), split, OPTIMIZER.make(), mesh=mesh,
                       rules=RULES)
    # A copy: placing consumes a LoRA base (re-laid out weight by weight); `params` serves again.
    trainable, frozen = steps.place(*split.split(dict(params)))
    shardings = jax.tree.map(lambda x: x.sharding, trainable)
    state = steps.init(trainable, SEED)
    state, metrics = steps.train(state, frozen, train_batch())
    kept = True
    if mesh is not None:
        same = lambda x, s: x.sharding.is_equivalent_to(s, x.ndim)  # noqa: E731
        kept = all(jax.tree.leaves(jax.tree.map(same, state.trainable, shardings))) and all(
            jax.tree.leaves(optax.tree_map_params(steps.optimizer, same, state.opt_state,
                                                  shardings, transform_non_params=lambda _: True)))
    leaves = [np.asarray(x) for x in jax.tree.leaves((state.trainable, state.opt_state))]
    return {name: float(value) for name, value in metrics.items()}, leaves, kept


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


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
    split = {leaf.shape for leaf in jax.tree.leaves(params)
             if not leaf.sharding.is_fully_replicated}
    whole = sum(1 for shape in gathered if shape in split)
    return counts, max((int(np.prod(s)) for s in gathered), default=0), whole


def flat_arrays(params):
    """{path: array} of a tree (a ServingWeight's stored array under its weight's path)."""
    return {'/'.join(k.key for k in path if hasattr(k, 'key')): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def shard_report(params, mesh):
    """{path: shape of the shard on the first device} of SHARD_PATHS, and whether every device
    holds 1/n of each weight split n ways by its spec (no more)."""
    flat = flat_arrays(params)
    exact = True
    for leaf in flat.values():
        used = [a for entry in leaf.sharding.spec if entry is not None
                for a in ((entry,) if isinstance(entry, str) else entry)]
        ways = int(np.prod([mesh.shape[a] for a in used]))
        exact &= all(shard.data.nbytes * ways == leaf.nbytes for shard in leaf.addressable_shards)
    return {path: list(flat[path].addressable_shards[0].data.shape) for path in SHARD_PATHS}, exact


def timed(times, name, fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    times[name] = round(time.perf_counter() - start, 2)
    print(f'{name}: {times[name]} s', flush=True)     # in the test's log
    return result


def mesh_report(model, params, schema, spec, expected, times):
    """Everything the tests check of one mesh against one device's `expected`."""
    mesh = sharding.make_mesh(spec)
    placed = sharding.shard_params(params, schema, mesh, RULES)
    sampler, tokens, logits = timed(times, f'{spec}/generate', generate, model, placed)
    report = {'tokens_equal': bool(np.array_equal(tokens, expected['tokens'])),
              'logits_diff': max_diff(logits, expected['logits']),
              'traces': [sampler.engine.num_traces['prefill'], sampler.engine.num_traces['step']]}
    for name, split in splits(model).items():
        metrics, state, kept = timed(times, f'{spec}/train_{name}', train, model, params, split,
                                     mesh)
        report[f'train_{name}'] = {'loss_diff': abs(metrics['loss'] - expected[name][0]['loss']),
                                   'state_diff': max_diff(state, expected[name][1]),
                                   'kept_shardings': kept}
    counts, largest, whole = timed(times, f'{spec}/collectives', collective_counts, sampler,
                                   placed)
    report.update(collectives=counts, largest_gather=largest, weights_gathered=whole)
    report['shards'], report['shares_exact'] = shard_report(placed, mesh)
    return report


def splits(model):
    return {'full': FullFineTuning(), 'lora': LoRA(model.config, rank=LORA_RANK, seed=SEED)}


def load_report(model, params, folder, times):
    """gemma3n.load onto a mesh from a Hugging Face folder and from our own file: every weight
    in its shards, the same values as converting on one device, the same logits."""
    mesh = sharding.make_mesh(LOAD_MESH)
    hf, native = folder / 'hf', folder / 'params.safetensors'
    save_hf(hf, params, CONFIG)
    save_params(params, native)
    _, expected = layout.to_serving(model, params, sparse_rows=False)     # a mesh keeps that order
    report = {}
    forward = jax.jit(lambda p, t, rows: model.apply({'params': p}, t,
                                                     per_layer_embeddings=rows).logits)
    tokens = np.array([prompt + [0] * (6 - len(prompt)) for prompt in PROMPTS], np.int32)
    logits = {}
    for name, path in (('hf', hf), ('native', native)):
        for where, on in (('mesh', mesh), ('one', None)):
            loaded = timed(times, f'load_{name}_{where}', gemma3n.load, path, model=CONFIG,
                           dtype=jnp.float32, tokenizer=False, progress=False, mesh=on,
                           sharding_rules=RULES)
            loaded_params = loaded.params
            if on is None:
                logits[name] = forward(loaded_params, tokens, loaded.per_layer_rows(tokens))
                continue
            report[name] = {'max_diff': max_diff(
                {k: v for k, v in flat_arrays(loaded_params).items()},
                {k: v for k, v in flat_arrays(expected).items()
                 if k in flat_arrays(loaded_params)})}
            report[name]['shards'], report[name]['shares_exact'] = shard_report(
                loaded_params, mesh)
            q = loaded_params['layer_0']['attn']['q_einsum']['w'].value  # stored [N, H, D]
            report[name]['q_spec'] = [str(entry) for entry in q.sharding.spec]
            logits[f'{name}_mesh'] = forward(loaded_params, tokens, loaded.per_layer_rows(tokens))
    for name in ('hf', 'native'):
        report[name]['logits_diff'] = max_diff(logits[f'{name}_mesh'], logits[name])
    return report


def run_meshes(out_dir):
    out_dir = Path(out_dir)
    start = time.perf_counter()
    times = {}
    model, params, schema = model_and_params()
    _, tokens, logits = timed(times, 'one/generate', generate, model, params)
    expected = {'tokens': tokens, 'logits': logits}
    for name, split in splits(model).items():
        expected[name] = timed(times, f'one/train_{name}', train, model, params, split)[:2]
    report = {'loss': {name: expected[name][0]['loss'] for name in splits(model)}}
    for spec in MESHES:
        report[spec] = mesh_report(model, params, schema, spec, expected, times)
    report['load'] = load_report(model, params, out_dir, times)
    # The multi-process comparison: the same mesh on 4 devices of this one process.
    mesh = sharding.make_mesh(PROCESS_MESH, jax.devices()[:4])
    _, four_tokens, four_logits = timed(times, 'four/generate', generate, model,
                                        sharding.shard_params(params, schema, mesh, RULES))
    np.savez(out_dir / 'four.npz', tokens=four_tokens, logits=four_logits)
    times['total'] = round(time.perf_counter() - start, 2)
    report['times'] = times
    (out_dir / 'report.json').write_text(json.dumps(report, indent=1))


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
