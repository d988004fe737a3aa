"""A fine-tuning run: data in, train state checkpoints, metrics and the fine-tuned model out.

The folder `out` receives `run_config.json`, the train state checkpoints (`train_state/`),
`metrics.jsonl` (one line per step, and per evaluation), at the end `loss.png` and the
fine-tuned model as a checkpoint folder that `gemma3n generate/chat --checkpoint OUT` and
`load_params` read (gemma3n/checkpoints/native.py: `save_checkpoint_folder`).

Example:
    >>> options = FinetuneOptions(data='train.jsonl', steps=100, batch_size=8, seq_len=512,
    ...                           learning_rate=1e-4)
    >>> result = FinetuneRun(model, tokenizer, options, Path('out')).run(params)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gemma3n.checkpoints.hf_config import check_representable
from gemma3n.checkpoints.native import save_checkpoint_folder
from gemma3n.checkpoints.peft_adapter import save_adapter
from gemma3n.layers import special_ids
from gemma3n.text.tokenizer import Tokenizer
from gemma3n.training.checkpointing import (STATE_FOLDER, StateStore, check_run_config,
                                            claim_run_folder)
from gemma3n.training.data import LossOn, read_jsonl
from gemma3n.training.optimizer import OptimizerConfig
from gemma3n.training.lora import LoRA
from gemma3n.training.packing import Rows, TooLong
from gemma3n.training.param_split import FullFineTuning, ParamSplit, cast_floating
from gemma3n.training.plot import plot_losses, pyplot
from gemma3n.training.step import TrainSteps
from gemma3n.training.stream import BatchStream

logger = logging.getLogger(__name__)

METRICS_FILE = 'metrics.jsonl'
PLOT_FILE = 'loss.png'
# Keys the model reads from the batch (gemma3n.training.packing names the fields).
MODEL_KEYS = dict(tokens='batch.input', positions='batch.positions',
                  attention_mask='batch.attention_mask')


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    """What a run does. `batch_size` rows per optimizer step, in `grad_accum` micro-batches."""
    data: str
    steps: int
    batch_size: int
    seq_len: int
    learning_rate: float
    eval_data: str | None = None
    grad_accum: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    seed: int = 0
    pack: bool = True
    too_long: TooLong = TooLong.TRUNCATE
    loss_on: LossOn = LossOn.MODEL_TURNS
    freeze: tuple[str, ...] = ()
    remat: bool = False
    save_every: int = 100
    keep: int = 3
    eval_every: int = 0           # 0: only at the end

    def __post_init__(self):
        for name in ('steps', 'batch_size', 'seq_len', 'grad_accum', 'save_every', 'keep'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be at least 1, got {getattr(self, name)}')
        if self.batch_size % self.grad_accum:
            raise ValueError(f'the batch size {self.batch_size} must be a multiple of the '
                             f'gradient accumulation steps {self.grad_accum}')

    def optimizer(self) -> OptimizerConfig:
        return OptimizerConfig(learning_rate=self.learning_rate, total_steps=self.steps,
                               warmup_steps=self.warmup_steps, weight_decay=self.weight_decay,
                               clip_norm=self.clip_norm)

    def run_config(self, model: Any) -> dict[str, Any]:
        """What a resumed run must share with the run it continues (JSON-able)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields = {name: value.value if isinstance(value, (TooLong, LossOn)) else value
                  for name, value in fields.items()}
        fields['freeze'] = list(self.freeze)
        fields['model'] = repr(model.config)
        fields['dtype'] = np.dtype(model.dtype).name
        return fields


@dataclasses.dataclass
class FinetuneResult:
    """losses: (step, train loss) of every step run now; eval_losses: (step, eval loss)."""
    losses: list[tuple[int, float]]
    eval_losses: list[tuple[int, float]]
    truncated: int
    skipped: int
    plot: Path | None


class FinetuneRun:
    """A run of `options` on `model` (its dtype: the compute dtype) into folder `out`.

    Creating it checks every input (data files, options, freeze patterns, the folder against
    `resume`) and tokenises the data, before any weight is read or program compiled; `run`
    then trains from the given weights. `split` chooses what trains (default: every weight but
    `options.freeze`); with a `LoRA` split the result is a PEFT adapter folder naming `base`
    (the checkpoint trained on; None: the demo model) instead of a checkpoint. With a `mesh`
    (`gemma3n.sharding.make_mesh`), the weights, the optimizer state and the batch are split
    over its devices by the sharding rules (one process: it reads the whole result back).

    Example:
        >>> run = FinetuneRun(model, tokenizer, options, Path('out'))
        >>> result = run.run(params)
    """

    def __init__(self, model: Any, tokenizer: Tokenizer, options: FinetuneOptions, out: Path,
                 *, resume: bool = False, split: ParamSplit | None = None,
                 base: str | None = None, mesh: Mesh | None = None):
        self.out, self.options, self.base = Path(out).expanduser(), options, base
        self.mesh = mesh
        self.tokenizer, self.resume = tokenizer, resume
        pyplot()
        self.model = model.clone(remat=options.remat, **MODEL_KEYS)
        self.optimizer = options.optimizer()
        examples = read_jsonl(options.data, tokenizer, options.loss_on)
        self.eval_rows = None
        if options.eval_data is not None:
            self.eval_rows = Rows.from_examples(
                read_jsonl(options.eval_data, tokenizer, options.loss_on), options.seq_len,
                pack=options.pack, too_long=options.too_long)
        self.stream = BatchStream(examples, seq_len=options.seq_len,
                                  batch_size=options.batch_size, seed=options.seed,
                                  pack=options.pack, too_long=options.too_long)
        _report_cuts(options.data, self.stream.truncated, self.stream.skipped, options.seq_len)
        if self.eval_rows is not None:
            _report_cuts(options.eval_data, self.eval_rows.truncated, self.eval_rows.skipped,
                         options.seq_len)
        self.split = FullFineTuning(freeze=options.freeze) if split is None else split
        self.split.split(jax.eval_shape(self.model.init, jax.random.key(0),
                                        jnp.ones((1, 1), jnp.int32))['params'])
        # The result's config.json is HF's text config: a model it cannot describe is refused
        # now, not after the training.
        check_representable(self.model.config)
        self.run_config = {**options.run_config(self.model), 'split': repr(self.split)}
        check_run_config(self.out, self.run_config, resume)

    def run(self, params: Any, on_step: Callable[[int, dict[str, float]], None] | None = None
            ) -> FinetuneResult:
        """Trains from `params` (or from the last checkpoint, resuming); saves the model. A
        LoRA run consumes `params`: its frozen base is re-laid out weight by weight
        (`LoRA.hold_frozen`), the tree given emptied so that memory never holds two bases.

        `on_step(step, metrics)` is called after every step (metrics: loss (mean over the
        target tokens), tokens (targets counted), tokens_per_s (non-padding input tokens per
        second of the step), grad_norm (before clipping), learning_rate).
        """
        options, stream, out = self.options, self.stream, self.out
        claim_run_folder(out, self.run_config)
        steps = TrainSteps(self.model, self.split, self.optimizer.make(), mesh=self.mesh)
        trainable, frozen = steps.place(*self.split.split(params))
        del params
        state = steps.init(trainable, options.seed)
        store = StateStore(out / STATE_FOLDER, keep=options.keep)
        metrics_path = out / METRICS_FILE
        if self.resume and store.latest_step() is not None:
            state, stream.position = store.restore(state)
            _keep_metrics_until(metrics_path, int(state.step))
        schedule = self.optimizer.schedule()
        result = FinetuneResult([], [], stream.truncated, stream.skipped, None)
        micro = (options.grad_accum, options.batch_size // options.grad_accum)
        try:
            with open(metrics_path, 'a', encoding='utf-8') as metrics_file:
                while int(state.step) < options.steps:
                    start = time.perf_counter()
                    batch = stream.next_batch()
                    real_tokens = int(np.sum(batch['input'] != special_ids.PAD))
                    batch = jax.tree.map(lambda x: x.reshape(micro + x.shape[1:]), batch)
                    state, metrics = steps.train(state, frozen, batch)
                    step = int(state.step)
                    metrics = {name: float(value) for name, value in metrics.items()}
                    metrics['tokens_per_s'] = real_tokens / (time.perf_counter() - start)
                    metrics['learning_rate'] = float(schedule(step - 1))
                    _write(metrics_file, dict(step=step, **metrics))
                    result.losses.append((step, metrics['loss']))
                    if on_step is not None:
                        on_step(step, metrics)
                    if step % options.save_every == 0 or step == options.steps:
                        store.save(state, stream.position)
                    if self.eval_rows is not None and (step == options.steps or (
                            options.eval_every and step % options.eval_every == 0)):
                        loss = evaluate(steps, state, frozen, self.eval_rows, options.batch_size)
                        _write(metrics_file, dict(step=step, eval_loss=loss))
                        result.eval_losses.append((step, loss))
        finally:
            store.close()
        if isinstance(self.split, LoRA):
            save_adapter(out, self.split.factors(state.trainable), self.model.config,
                         rank=self.split.rank, alpha=self.split.alpha,
                         targets=tuple(self.split.targets), base=self.base)
        else:
            final = cast_floating(self.split.export(state.trainable, frozen), self.model.dtype)
            save_checkpoint_folder(jax.tree.map(np.asarray, final), self.model.config, out,
                                   tokenizer_file=self.tokenizer.path)
        result.plot = plot_losses(metrics_path, out / PLOT_FILE)
        return result


def evaluate(steps: TrainSteps, state: Any, frozen: Any, rows: Rows, batch_size: int) -> float:
    """Mean loss over every target token of `rows`, in batches of `batch_size` rows."""
    total, count = 0.0, 0.0
    for start in range(0, rows.num_rows, batch_size):
        # The last batch is filled up with repeats of row 0, whose targets are then not counted.
        indices = np.arange(start, start + batch_size)
        batch = rows.batch(np.where(indices < rows.num_rows, indices, 0))
        batch['loss_mask'] &= (indices < rows.num_rows)[:, None]
        loss, tokens = steps.eval(state.trainable, frozen, batch)
        total, count = total + float(loss), count + float(tokens)
    return total / max(count, 1.0)


def _report_cuts(path: str, truncated: int, skipped: int, seq_len: int) -> None:
    if truncated:
        logger.warning('%s: %d example(s) longer than the sequence length %d were truncated',
                       path, truncated, seq_len)
    if skipped:
        logger.warning('%s: %d example(s) were skipped: longer than the sequence length %d, or '
                       'nothing left to learn from once truncated', path, skipped, seq_len)


def _write(file, record: dict[str, Any]) -> None:
    file.write(json.dumps(record) + '\n')
    file.flush()


def _keep_metrics_until(path: Path, step: int) -> None:
    """Drops the metrics of steps after `step` (run after the last checkpoint, to be redone)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines(keepends=True)
             if line.strip() and json.loads(line)['step'] <= step]
    path.write_text(''.join(lines))
