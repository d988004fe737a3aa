"""`gemma3n finetune`: full or LoRA fine-tuning of a checkpoint (or of the demo model) on JSONL
chat data.

The options are one table (`FINETUNE_OPTIONS`): a new one (e.g. LoRA's `--lora-rank`) is one
more row, read by `finetune_options` from `args` by its destination name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import tqdm

from gemma3n.cli.console import COMPILING_DEMO, PROG, compiling, logger
from gemma3n.checkpoints.peft_adapter import LORA_TARGETS
from gemma3n.cli.model import DEMO_NOTICE, plan_model
from gemma3n.loading import QUANTIZE_FORMATS
from gemma3n.sharding import make_mesh
from gemma3n.training.data import LossOn
from gemma3n.training.finetune import FinetuneOptions, FinetuneRun
from gemma3n.training.lora import LoRA
from gemma3n.training.packing import TooLong

# (flags, argparse keywords): the options of the run, beyond the model's.
FINETUNE_OPTIONS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (('--data',), dict(required=True, metavar='FILE',
                       help='training data, JSONL: {"messages": [{"role": "user"|"assistant"|'
                            '"system", "content": ...}, ...]} or {"text": ...} per line')),
    (('--eval',), dict(dest='eval_data', metavar='FILE',
                       help='evaluation data (same format): its loss is logged at the end and '
                            'every --eval-every steps')),
    (('--out',), dict(required=True, metavar='DIR',
                      help='the run\'s folder: train state checkpoints, metrics.jsonl, loss.png '
                           'and the fine-tuned model (gemma3n chat --checkpoint DIR)')),
    (('--resume',), dict(action='store_true',
                         help='continue the run in --out from its last checkpoint (same options)')),
    (('--steps',), dict(type='positive', required=True, metavar='N', help='optimizer steps')),
    (('--batch-size',), dict(type='positive', default=8, metavar='B',
                             help='rows per step (default 8)')),
    (('--grad-accum',), dict(type='positive', default=1, metavar='K',
                             help='split each step\'s rows into K micro-batches, to save memory '
                                  '(default 1)')),
    (('--seq-len',), dict(type='positive', default=512, metavar='L',
                          help='tokens per row (default 512)')),
    (('--lr',), dict(dest='learning_rate', type=float, default=1e-4, metavar='X',
                     help='peak learning rate of AdamW (default 1e-4)')),
    (('--warmup-steps',), dict(type='whole', default=0, metavar='N',
                               help='linear warmup steps, then cosine decay (default 0)')),
    (('--weight-decay',), dict(type=float, default=0.0, metavar='W',
                               help='AdamW weight decay of the matrices (default 0)')),
    (('--clip-norm',), dict(type=float, default=1.0, metavar='C',
                            help='clip the gradient\'s global norm to C (default 1)')),
    (('--seed',), dict(type='whole', default=0, help='data shuffling seed (default 0)')),
    (('--no-packing',), dict(dest='pack', action='store_false',
                             help='one example per row, padded (default: pack several per row, '
                                  'attention kept inside each)')),
    (('--too-long',), dict(choices=[t.value for t in TooLong], default=TooLong.TRUNCATE.value,
                           help='an example longer than --seq-len: truncate it or skip it '
                                '(default truncate; either is counted and reported)')),
    (('--loss-on',), dict(choices=[t.value for t in LossOn], default=LossOn.MODEL_TURNS.value,
                          help='which tokens the loss counts: the assistant\'s answers '
                               '(default) or all')),
    (('--freeze',), dict(action='append', default=[], metavar='PATTERN',
                         help='keep the weights whose path matches PATTERN (fnmatch, e.g. '
                              '"embedder/*") fixed; repeatable')),
    (('--lora-rank',), dict(type='positive', metavar='R',
                            help='train a LoRA adapter of rank R instead of the weights: --out '
                                 'gets a PEFT adapter folder (run it with --checkpoint BASE '
                                 '--adapter OUT)')),
    (('--lora-alpha',), dict(type=float, metavar='A',
                             help='LoRA scale numerator: the update is (A / R)·B·A '
                                  '(default 2R)')),
    (('--lora-targets',), dict(metavar='NAMES', default=','.join(LORA_TARGETS),
                               help='comma-separated modules to adapt, named as PEFT names them '
                                    f'(default: all of {",".join(LORA_TARGETS)})')),
    (('--int8',), dict(action='store_true',
                       help='with --lora-rank: hold the frozen base\'s large weights as int8 '
                            '(one scale per output channel), about half the memory of '
                            'bfloat16')),
    (('--int4',), dict(action='store_true',
                       help='with --lora-rank: hold them as int4 (groups of 32 with a scale '
                            'each), about a quarter of the memory, less accurate')),
    (('--remat',), dict(action='store_true',
                        help='recompute each layer\'s activations in the backward pass: less '
                             'memory, ~1/3 more compute')),
    (('--save-every',), dict(type='positive', default=100, metavar='N',
                             help='checkpoint the train state every N steps (default 100)')),
    (('--keep',), dict(type='positive', default=3, metavar='N',
                       help='train state checkpoints to keep (default 3)')),
    (('--eval-every',), dict(type='whole', default=0, metavar='N',
                             help='evaluate every N steps (default 0: at the end only)')),
)


def add_finetune_options(parser: argparse.ArgumentParser, types: dict[str, Any]) -> None:
    """Adds FINETUNE_OPTIONS to `parser`; `types` maps the table's type names to parsers."""
    group = parser.add_argument_group('fine-tuning')
    for flags, keywords in FINETUNE_OPTIONS:
        keywords = dict(keywords)
        if isinstance(keywords.get('type'), str):
            keywords['type'] = types[keywords['type']]
        group.add_argument(*flags, **keywords)


def finetune_options(args: argparse.Namespace) -> FinetuneOptions:
    """The run's options from the command's (ValueError naming a bad value)."""
    return FinetuneOptions(
        data=args.data, eval_data=args.eval_data, steps=args.steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, seq_len=args.seq_len, learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        clip_norm=args.clip_norm, seed=args.seed, pack=args.pack,
        too_long=TooLong(args.too_long), loss_on=LossOn(args.loss_on), freeze=tuple(args.freeze),
        remat=args.remat, save_every=args.save_every, keep=args.keep,
        eval_every=args.eval_every)


def lora_split(args: argparse.Namespace, config: Any) -> LoRA | None:
    """The LoRA the options ask for (None: full fine-tuning); ValueError naming a bad option."""
    quantize = next((fmt for fmt in QUANTIZE_FORMATS if getattr(args, fmt)), None)
    if args.int8 and args.int4:
        raise ValueError('choose --int8 or --int4, not both.')
    if args.lora_rank is None:
        if args.lora_alpha is not None:
            raise ValueError('--lora-alpha needs --lora-rank.')
        if quantize is not None:
            raise ValueError(f'--{quantize} needs --lora-rank: full fine-tuning trains the '
                             f'weights themselves, and {quantize} values have no gradient '
                             '(only a frozen base can be quantized).')
        return None
    if args.freeze:
        raise ValueError('--freeze applies to full fine-tuning; LoRA trains only its adapters.')
    alpha = 2.0 * args.lora_rank if args.lora_alpha is None else args.lora_alpha
    targets = tuple(name.strip() for name in args.lora_targets.split(',') if name.strip())
    return LoRA(config, rank=args.lora_rank, alpha=alpha, targets=targets, seed=args.seed,
                quantize=quantize)


def run_finetune(args: argparse.Namespace) -> int:
    options = finetune_options(args)
    mesh = make_mesh(args.mesh) if args.mesh else None
    # The model (its dtype: the compute dtype), the tokenizer and the checkpoint to start from
    # (None: the demo's random weights); no weights read yet.
    plan = plan_model(args)
    out = Path(args.out).expanduser()
    run = FinetuneRun(plan.model, plan.tokenizer, options, out, resume=args.resume,
                      split=lora_split(args, plan.model.config),
                      base=None if plan.checkpoint is None else str(Path(plan.checkpoint.path).resolve()),
                      mesh=mesh)
    if plan.checkpoint is None:
        sys.stderr.write(DEMO_NOTICE + '\n')
        with compiling(COMPILING_DEMO):
            params = plan.tree()
    else:
        logger.info('loading %s for fine-tuning', plan.checkpoint.path)
        params = plan.tree()
    bar = tqdm.tqdm(total=options.steps, desc='fine-tuning', unit='step', file=sys.stderr,
                    dynamic_ncols=True)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if bar.n == 0:
            bar.update(step - 1)          # a resumed run starts where it stopped
        bar.set_postfix(loss=f'{metrics["loss"]:.4f}',
                        tokens_per_s=f'{metrics["tokens_per_s"]:.0f}', refresh=False)
        bar.update(1)

    try:
        result = run.run(params, on_step=on_step)
    finally:
        bar.close()
    if result.losses:
        sys.stderr.write(f'{PROG}: final training loss {result.losses[-1][1]:.4f} (step '
                         f'{result.losses[-1][0]})\n')
    if result.eval_losses:
        sys.stderr.write(f'{PROG}: eval loss {result.eval_losses[-1][1]:.4f}\n')
    if args.lora_rank is None:
        saved, usage = 'fine-tuned model', f'--checkpoint {out}'
    else:
        base = '' if plan.checkpoint is None else f' --checkpoint {plan.checkpoint.path}'
        saved, usage = 'LoRA adapter', f'{base} --adapter {out}'.strip()
    sys.stderr.write(f'{PROG}: loss curves: {result.plot}\n'
                     f'{PROG}: {saved} saved in {out}: try it with `{PROG} chat {usage}`\n')
    return 0

