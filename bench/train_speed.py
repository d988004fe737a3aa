"""Fine-tuning speed and memory: ours (JAX) against `transformers` (torch), same config; full
or, with `--lora-rank R`, LoRA (ours: `gemma3n.training.lora.LoRA`; torch: `peft`, the same
seven targets, rank and alpha 2R, float32 adapters over a frozen base held in `--base-dtype`:
bfloat16 by default, the compute dtype, as `gemma3n finetune` holds a checkpoint's weights
and as peft users load theirs; float32 as a run from float32 weights would).

Both sides train every weight of the same Gemma 3n config (E4B widths, fewer layers) with
AdamW, float32 parameters and bfloat16 compute (ours: the model's bfloat16 dtype over float32
master weights; torch: `autocast` to bfloat16), the loss over all tokens of random rows, on the
CPU with all its threads. Each side runs in its own process, one after the other, so its peak
resident memory (`ru_maxrss`) is its own and the two never share the CPUs.

    python -m bench.train_speed                                # E4B widths, 10 layers, 4 x 512
    python -m bench.train_speed --layers 5 --vocab 16384 --seq-len 128 --batch-size 2 --steps 2
    python -m bench.train_speed --widths tiny --vocab 4096     # a smoke test, seconds a step
    python -m bench.train_speed --lora-rank 16                 # LoRA against transformers+peft
    python -m bench.train_speed --lora-rank 16 --layers 5 --vocab 16384 --seq-len 128 \
        --batch-size 1 --steps 2                               # the same, a minute or two

Memory: E4B widths put ~110M parameters in each layer; full fine-tuning keeps 16 bytes per
parameter (float32 weight, gradient, two Adam moments) besides the activations: 10 layers at
E4B widths with E4B's vocabulary need ~40 GB a side.

Writes bench/results/train-<UTC time>.json and prints a table with the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import common, process_memory

E4B_VOCAB = 262144
PATTERN = 5                 # LLLLG: KV sharing starts at a multiple of it (HF's rule = ours)
SPARSE_LAYERS = 3
LEARNING_RATE = 1e-5
DATA_SEED = 3
WEIGHT_SCALE = 0.02         # our random weights (torch's: its own init); only speed matters


def bench_config(layers: int, vocab: int, widths: str) -> Any:
    """`widths` ('e4b', or 'tiny' for a smoke test) with `layers` layers (a multiple of 5), the
    second half (rounded to whole patterns) sharing K/V as E4B's last layers do."""
    from gemma3n.config import TransformerConfig
    from gemma3n.models import E4B_HIDDEN_DIM
    if layers % PATTERN:
        raise ValueError(f'--layers must be a multiple of {PATTERN}, got {layers}')
    sizes = dict(hidden_dim=E4B_HIDDEN_DIM) if widths == 'e4b' else dict(common.TINY_WIDTHS)
    sizes['num_embed'] = vocab
    return TransformerConfig.gemma3n(
        num_layers=layers, num_shared_layers=(layers // 2) // PATTERN * PATTERN,
        num_sparse_layers=min(SPARSE_LAYERS, layers), **sizes)


def rows(args: argparse.Namespace) -> np.ndarray:
    rng = np.random.default_rng(DATA_SEED)
    return rng.integers(3, args.vocab, size=(args.steps + 1, args.batch_size, args.seq_len + 1),
                        dtype=np.int32)


def side_ours(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from bench.train_memory import step_memory
    from gemma3n.training.lora import LoRA
    from gemma3n.training.optimizer import OptimizerConfig
    from gemma3n.training.param_split import FullFineTuning
    from gemma3n.training.step import TrainSteps
    from gemma3n.transformer import Gemma3nTransformer

    config = bench_config(args.layers, args.vocab, args.widths)
    model = Gemma3nTransformer(config=config, text_only=True, dtype=jnp.bfloat16,
                               tokens='batch.input', remat=args.remat)
    # The frozen base in --base-dtype, as `finetune` holds a checkpoint read in it.
    base_dtype = jnp.float32 if args.lora_rank is None else getattr(jnp, args.base_dtype)
    params = common.leafwise_random_params(model, base_dtype, WEIGHT_SCALE)
    split = FullFineTuning() if args.lora_rank is None else LoRA(
        config, rank=args.lora_rank, alpha=2.0 * args.lora_rank, quantize=args.quantize)
    steps = TrainSteps(model, split, OptimizerConfig(LEARNING_RATE, args.steps + 1).make())
    # As `finetune` places them: a LoRA base re-laid out [out, in], int8 or int4 with
    # --quantize (`LoRA.hold_frozen`).
    trainable, frozen = steps.place(*split.split(params))
    del params
    state = steps.init(trainable, seed=0)
    del trainable
    process_memory.reset_peak_rss()
    times, losses, compiled = [], [], None
    for tokens in rows(args):
        batch = {'input': tokens[None, :, :-1], 'target': tokens[None, :, 1:],
                 'loss_mask': np.ones((1,) + tokens[:, 1:].shape, bool)}
        start = time.perf_counter()
        if compiled is None:        # compiled here, so that XLA's memory accounting is at hand
            compiled = steps.train.lower(state, frozen, batch).compile()
        state, metrics = compiled(state, frozen, batch)
        losses.append(float(metrics['loss']))
        times.append(time.perf_counter() - start)
    return {'name': 'ours (JAX)', 'jax': jax.__version__, 'times_s': times, 'losses': losses,
            'xla_bytes': step_memory(compiled),
            'train_peak_rss_gb': process_memory.peak_rss_since_reset_bytes() / common.GB}


def side_hf(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers
    from gemma3n.checkpoints.hf_mapping import hf_text_config

    torch.set_num_threads(os.cpu_count())
    config = bench_config(args.layers, args.vocab, args.widths)
    hf_config = transformers.Gemma3nTextConfig(**hf_text_config(config, hf_vocab_size=args.vocab),
                                               attn_implementation='sdpa')
    object.__setattr__(hf_config, 'final_logit_softcapping', None)   # ours has none
    # Made in the base's dtype: made in float32 and cast, its peak would be float32's.
    base_dtype = torch.float32 if args.lora_rank is None else getattr(torch, args.base_dtype)
    model = transformers.Gemma3nForCausalLM._from_config(hf_config, torch_dtype=base_dtype)
    model.train()
    if args.remat:
        model.gradient_checkpointing_enable()
    if args.lora_rank is not None:
        import peft
        # peft keeps the adapters in float32 over a bfloat16 base (autocast_adapter_dtype).
        from gemma3n.checkpoints.peft_adapter import LORA_TARGETS
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=list(LORA_TARGETS)))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=LEARNING_RATE, weight_decay=0.0)
    process_memory.reset_peak_rss()
    times, losses = [], []
    for tokens in rows(args):
        tokens = torch.from_numpy(tokens).long()
        start = time.perf_counter()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            logits = model(input_ids=tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        times.append(time.perf_counter() - start)
    return {'name': 'transformers (torch, sdpa)', 'torch': torch.__version__,
            'transformers': transformers.__version__, 'torch_threads': torch.get_num_threads(),
            'times_s': times, 'losses': losses,
            'train_peak_rss_gb': process_memory.peak_rss_since_reset_bytes() / common.GB}


SIDES = {'ours': side_ours, 'hf': side_hf}


def summary(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """tokens/s of the steps after the first (which compiles), first step s, peak memory
    while training and over the whole process (weight making included)."""
    steady = float(np.median(result['times_s'][1:]))
    return {'tokens_per_s': args.batch_size * args.seq_len / steady,
            'first_step_s': result['times_s'][0], 'peak_rss_gb': result['peak_rss_gb'],
            'train_peak_rss_gb': result['train_peak_rss_gb']}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--layers', type=int, default=10)
    parser.add_argument('--vocab', type=int, default=E4B_VOCAB)
    parser.add_argument('--widths', choices=('e4b', 'tiny'), default='e4b',
                        help='tiny: the small widths of bench.common, a smoke test')
    parser.add_argument('--seq-len', type=int, default=512)
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--steps', type=int, default=3, help='timed steps after the first')
    parser.add_argument('--remat', action='store_true', help='rematerialise blocks (both sides)')
    parser.add_argument('--lora-rank', type=int, help='train LoRA adapters of this rank, not '
                        'every weight (both sides)')
    parser.add_argument('--base-dtype', choices=('bfloat16', 'float32'), default='bfloat16',
                        help='LoRA: the dtype of the frozen base (both sides; default bfloat16)')
    parser.add_argument('--quantize', choices=('int8', 'int4'),
                        help='LoRA: ours holds the base\'s large weights int8 or int4 '
                             '(`finetune --int8`), quantized from --base-dtype; peft\'s stays '
                             'in --base-dtype')
    parser.add_argument('--ours-only', action='store_true',
                        help='run only our side (A/B runs of our changes)')
    parser.add_argument('--side', choices=tuple(SIDES), help=argparse.SUPPRESS)
    parser.add_argument('--out', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = SIDES[args.side](args)
        result['peak_rss_gb'] = process_memory.peak_rss_bytes() / common.GB
        Path(args.out).write_text(json.dumps(result))
        return

    machine = common.machine_info()
    options = [f'--{name.replace("_", "-")}={getattr(args, name)}'
               for name in ('layers', 'vocab', 'widths', 'seq_len', 'batch_size', 'steps')]
    options += ['--remat'] if args.remat else []
    options += ([f'--lora-rank={args.lora_rank}', f'--base-dtype={args.base_dtype}']
                if args.lora_rank else [])
    options += [f'--quantize={args.quantize}'] if args.quantize else []
    results = {}
    for side in ('ours',) if args.ours_only else SIDES:
        out = common.results_path(f'train-{side}')
        out.parent.mkdir(parents=True, exist_ok=True)
        common.run_python(['-m', 'bench.train_speed', f'--side={side}', f'--out={out}', *options])
        results[side] = json.loads(out.read_text())
        out.unlink()
    if args.ours_only:
        results['hf'] = {'name': 'transformers (not run)', 'times_s': [math.nan] * 2,
                         'losses': [math.nan], 'peak_rss_gb': math.nan,
                         'train_peak_rss_gb': math.nan}
    ours, hf = (summary(results[side], args) for side in SIDES)
    config = bench_config(args.layers, args.vocab, args.widths)
    table = common.format_table(
        ['', results['ours']['name'], results['hf']['name'], 'ratio'],
        [['tokens/s', ours['tokens_per_s'], hf['tokens_per_s'],
          common.ratio(ours['tokens_per_s'], hf['tokens_per_s'])],
         ['first step s (ours: compile)', ours['first_step_s'], hf['first_step_s'], None],
         ['peak resident memory while training GB', ours['train_peak_rss_gb'],
          hf['train_peak_rss_gb'], common.ratio(ours['train_peak_rss_gb'],
                                                hf['train_peak_rss_gb'])],
         ['peak resident memory, whole process GB', ours['peak_rss_gb'], hf['peak_rss_gb'],
          common.ratio(ours['peak_rss_gb'], hf['peak_rss_gb'])],
         ['XLA temporaries of the step GB', results['ours']['xla_bytes']['temp'] / common.GB,
          None, None],
         ['loss, first step', results['ours']['losses'][0], results['hf']['losses'][0], None]])
    kind = ('Full fine-tuning' if args.lora_rank is None
            else f'LoRA rank {args.lora_rank} over a {args.base_dtype} base'
            + (f' (ours: {args.quantize})' if args.quantize else ''))
    print(f'{kind}, {config.num_layers} layers at {args.widths} widths '
          f'({common.param_count(config) / 1e6:.0f}M parameters, vocabulary {args.vocab}), '
          f'batch {args.batch_size} x {args.seq_len} tokens, {machine["cpus"]} CPUs, load '
          f'average {" ".join(f"{x:.1f}" for x in machine["load_average"])} at the start, '
          f'{" ".join(f"{x:.1f}" for x in os.getloadavg())} at the end')
    print(table)
    path = common.write_json({'args': vars(args), 'machine': machine, 'results': results,
                              'summary': {'ours': ours, 'hf': hf}, 'table': table},
                             common.results_path('train'))
    print(f'written: {path}', file=sys.stderr)


if __name__ == '__main__':
    main()
