"""Does a LoRA fine-tuning step of the full E4B fit in memory? Measured without running it.

The train step of `gemma3n finetune --lora-rank R` (`gemma3n.training.step.TrainSteps.train`,
LoRA on the seven PEFT targets, AdamW, the model's batch keys of `gemma3n.training.finetune`)
is lowered and compiled for abstract inputs (`jax.eval_shape`: no weight is ever made) of the
full E4B text decoder, and XLA's own accounting of the compiled program
(`compiled.memory_analysis()`) gives its device bytes: arguments (frozen base, train state,
batch), outputs, temporaries (activations, gradients, XLA's buffers), minus what the donated
state shares with the outputs. The frozen base is held as `finetune` holds it: every weight,
the per-layer table included, in the compute dtype bfloat16 (`load_params(dtype=bfloat16)`) and
the serving layout (`LoRA.hold_frozen`), or int8 (`--base int8`: the projections quantized as
`to_serving(quantize_int8=True)` makes them; a run refuses to train over it, its gradients
being wrong, so that figure is only what such a step would hold).
The host side adds what the process holds besides the arrays: the runtime and the compiled
program (its resident memory after compiling, every array being abstract).

    python -m bench.train_memory                         # E4B, bf16 base, remat, 1 x 512
    python -m bench.train_memory --base int8 --batch-size 4
    python -m bench.train_memory --layers 5 --vocab 16384 --seq-len 128 --no-remat  # seconds

Prints a table and writes bench/results/train-memory-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from typing import Any

from bench import common, process_memory

GIB = 1 << 30
BUDGET_GIB = 24           # the question asked: a 24 GiB machine (or accelerator)
LORA_RANK = 16
LEARNING_RATE = 1e-4


def abstract_bytes(tree: Any) -> int:
    import jax
    import numpy as np
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(tree))


def abstract_batch(micro_steps: int, rows: int, seq_len: int) -> dict[str, Any]:
    """The fields `BatchStream.next_batch` gives, shaped [K, B/K, ...] as the step takes them."""
    import jax
    import jax.numpy as jnp
    shape = (micro_steps, rows // micro_steps, seq_len)
    return {'input': jax.ShapeDtypeStruct(shape, jnp.int32),
            'target': jax.ShapeDtypeStruct(shape, jnp.int32),
            'positions': jax.ShapeDtypeStruct(shape, jnp.int32),
            'loss_mask': jax.ShapeDtypeStruct(shape, jnp.bool_),
            'attention_mask': jax.ShapeDtypeStruct(shape + (seq_len,), jnp.bool_)}


def lora_step_inputs(model: Any, split: Any, *, base: str, batch: dict[str, Any]
                     ) -> tuple[Any, Any, Any, Any]:
    """(steps, abstract state, abstract frozen base, batch) of a LoRA run of `model`."""
    import jax
    import jax.numpy as jnp
    from gemma3n.layout import to_serving
    from gemma3n.training.optimizer import OptimizerConfig
    from gemma3n.training.step import TrainSteps

    params = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32))['params']
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, model.dtype), params)
    if base == 'int8':
        model, params = model, jax.eval_shape(
            lambda p: to_serving(model, p, quantize_int8=True)[1], params)
    trainable, frozen = jax.eval_shape(split.split, params)
    steps = TrainSteps(model, split, OptimizerConfig(LEARNING_RATE, total_steps=100).make())
    if base != 'int8':      # as a run holds it; an int8 base (training refused) stays as made
        frozen = jax.eval_shape(lambda tree: split.hold_frozen(model, dict(tree)), frozen)
    state = jax.eval_shape(functools.partial(steps.init, seed=0), trainable)
    return steps, state, frozen, batch


def step_memory(compiled: Any) -> dict[str, int]:
    """XLA's byte counts of a compiled step, and the peak they imply."""
    analysis = compiled.memory_analysis()
    counts = {name: int(getattr(analysis, f'{name}_size_in_bytes'))
              for name in ('argument', 'output', 'alias', 'temp', 'generated_code')}
    # Donated arguments are reused as outputs (alias): counted once.
    counts['peak'] = counts['argument'] + counts['output'] - counts['alias'] + counts['temp']
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--layers', type=int, help='fewer layers (a multiple of 5, E4B widths; '
                        'default: the full E4B, 35)')
    parser.add_argument('--vocab', type=int, help='another vocabulary (with --layers)')
    parser.add_argument('--base', choices=('bfloat16', 'int8'), default='bfloat16')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--grad-accum', type=int, default=1)
    parser.add_argument('--seq-len', type=int, default=512)
    parser.add_argument('--lora-rank', type=int, default=LORA_RANK)
    parser.add_argument('--no-remat', dest='remat', action='store_false')
    args = parser.parse_args()

    import jax.numpy as jnp
    from bench.train_speed import E4B_VOCAB, bench_config
    from gemma3n.models import e4b_config
    from gemma3n.training.finetune import MODEL_KEYS
    from gemma3n.training.lora import LoRA
    from gemma3n.transformer import Gemma3nTransformer

    machine = common.machine_info()
    if args.layers is None:
        if args.vocab is not None:
            parser.error('--vocab needs --layers (the full E4B has its own vocabulary)')
        config = e4b_config(with_vision=False)
    else:
        config = bench_config(args.layers, args.vocab or E4B_VOCAB, 'e4b')
    model = Gemma3nTransformer(config=config, text_only=True, dtype=jnp.bfloat16,
                               remat=args.remat, **MODEL_KEYS)
    split = LoRA(config, rank=args.lora_rank, alpha=2.0 * args.lora_rank)
    steps, state, frozen, batch = lora_step_inputs(
        model, split, base=args.base,
        batch=abstract_batch(args.grad_accum, args.batch_size, args.seq_len))
    start = time.perf_counter()
    compiled = steps.train.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - start
    counts = step_memory(compiled)
    host = process_memory.current_rss_bytes()
    total = counts['peak'] + host
    parts = {'frozen base': abstract_bytes(frozen), 'train state (adapters, Adam moments)':
             abstract_bytes(state), 'batch': abstract_bytes(batch)}
    rows = [[name, size / GIB] for name, size in parts.items()]
    rows += [[f'XLA {name}', counts[name] / GIB]
             for name in ('argument', 'output', 'alias', 'temp', 'generated_code')]
    rows += [['device peak (argument + output - alias + temp)', counts['peak'] / GIB],
             ['host: process resident memory after compiling', host / GIB],
             ['total', total / GIB]]
    table = common.format_table(['GiB', ''], rows)
    verdict = 'fits' if total <= BUDGET_GIB * GIB else 'does NOT fit'
    print(f'LoRA rank {args.lora_rank} step, {config.num_layers} layers '
          f'({common.param_count(config) / 1e9:.2f}B parameters, vocabulary {config.num_embed}), '
          f'{args.base} base, remat {args.remat}, batch {args.batch_size} x {args.seq_len} in '
          f'{args.grad_accum} micro-batch(es); compiled in {compile_s:.0f} s (load average '
          f'{" ".join(f"{x:.1f}" for x in machine["load_average"])})')
    print(table)
    print(f'{total / GIB:.2f} GiB: {verdict} in {BUDGET_GIB} GiB')
    path = common.write_json({'args': vars(args), 'machine': machine, 'bytes': counts,
                              'parts': parts, 'host_rss': host, 'compile_s': compile_s,
                              'table': table}, common.results_path('train-memory'))
    print(f'written: {path}', file=sys.stderr)


if __name__ == '__main__':
    main()
