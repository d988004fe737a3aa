"""LoRA adapters in the PEFT format: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names an adapter by the Hugging Face module it wraps (`q_proj`, ..., `down_proj`); the
Hugging Face mapping (`hf_mapping.mapping_entries`) says which of our weights holds that module,
and which half of it for the stacked ones (kv_einsum: k_proj, v_proj; gating_einsum: gate_proj,
up_proj). A `Slot` is one such (weight, half). Factors travel here as {our path: (a, b)} with
our layout (`gemma3n.layers.lora.LoRAWeight`); the file holds PEFT's [rank, in] `lora_A` and
[out, rank] `lora_B` per module, keys `prefix + 'layers.N.self_attn.q_proj.lora_A.weight'`.

Example:
    >>> slots = target_slots(config, ('q_proj', 'v_proj'))
    >>> save_adapter(out, factors, config, rank=8, alpha=16, targets=('q_proj', 'v_proj'))
    >>> adapter = load_adapter(out, config)        # validated against config
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

from gemma3n.checkpoints.hf_mapping import mapping_entries
from gemma3n.config import TransformerConfig

# The modules PEFT's LoRA wraps in a Gemma decoder layer, in its usual order; all seven is the
# common choice for Gemma.
LORA_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
CONFIG_FILE, WEIGHTS_FILE = 'adapter_config.json', 'adapter_model.safetensors'
# Where PEFT finds the text decoder in the released model (`Gemma3nForConditionalGeneration`);
# on a `Gemma3nForCausalLM` it is 'base_model.model.model.'.
PEFT_PREFIX = 'base_model.model.model.language_model.'
_KEY = re.compile(r'(.*?)(layers\.\d+\.(?:self_attn|mlp)\.(\w+))\.lora_([AB])\.weight')


@dataclasses.dataclass(frozen=True)
class Slot:
    """One adaptable matrix: our weight `path` (checkpoint `shape`, reading `in_axes`), the
    half `half` of its first `stacked` axes (0 when not stacked), the HF `module` name."""
    path: str
    shape: tuple[int, ...]
    in_axes: tuple[int, ...]
    stacked: int
    half: int
    module: str

    @property
    def target(self) -> str:
        return self.module.rsplit('.', 1)[1]

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[i] for i in self.in_axes)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Every axis but the stacked and input ones, in checkpoint order."""
        return tuple(s for i, s in enumerate(self.shape)
                     if i >= self.stacked and i not in self.in_axes)


def check_targets(targets: tuple[str, ...]) -> None:
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(f'unknown LoRA target(s) {unknown or "(none given)"}: the targets are '
                         f'{", ".join(LORA_TARGETS)}.')


def target_slots(config: TransformerConfig, targets: tuple[str, ...]) -> list[Slot]:
    """The slots of `targets` in `config`'s model. KV-shared layers have no k/v weights: their
    k_proj/v_proj are skipped."""
    check_targets(targets)
    slots = []
    for entry in mapping_entries(config):
        stacked = 1 if len(entry.hf_keys) > 1 else 0
        for half, key in enumerate(entry.hf_keys):
            module = key.removesuffix('.weight')
            if module.rsplit('.', 1)[-1] in targets:
                slots.append(Slot(entry.path, entry.shape, entry.in_axes, stacked, half, module))
    return slots


def to_peft(a: np.ndarray, b: np.ndarray, slot: Slot) -> tuple[np.ndarray, np.ndarray]:
    """Our factors of `slot`'s weight -> its (lora_A [r, in], lora_B [out, r])."""
    if slot.stacked:
        a, b = a[slot.half], b[slot.half]
    rank = a.shape[-1]
    return (np.ascontiguousarray(a.reshape(-1, rank).T),
            np.ascontiguousarray(b.reshape(rank, -1).T))


def from_peft(lora_a: np.ndarray, lora_b: np.ndarray, slot: Slot) -> tuple[np.ndarray, np.ndarray]:
    """(lora_A, lora_B) of `slot` -> our factors of that half [in..., r], [r, out...]."""
    rank = lora_a.shape[0]
    return lora_a.T.reshape(slot.in_shape + (rank,)), lora_b.T.reshape((rank,) + slot.out_shape)


def save_adapter(directory: str | os.PathLike, factors: Mapping[str, tuple[Any, Any]],
                 config: TransformerConfig, *, rank: int, alpha: float, targets: tuple[str, ...],
                 base: str | None = None, prefix: str = PEFT_PREFIX) -> Path:
    """Writes `factors` ({path: (a, b)}, float32) as a PEFT adapter; `base` names the base
    checkpoint (PEFT's base_model_name_or_path)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for slot in target_slots(config, targets):
        a, b = (np.asarray(f, np.float32) for f in factors[slot.path])
        tensors[f'{prefix}{slot.module}.lora_A.weight'], tensors[
            f'{prefix}{slot.module}.lora_B.weight'] = to_peft(a, b, slot)
    save_file(tensors, str(directory / WEIGHTS_FILE))
    adapter_config = dict(peft_type='LORA', task_type='CAUSAL_LM', r=rank, lora_alpha=alpha,
                          lora_dropout=0.0, target_modules=list(targets), bias='none',
                          fan_in_fan_out=False, use_rslora=False, base_model_name_or_path=base)
    (directory / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + '\n')
    return directory


@dataclasses.dataclass
class Adapter:
    """A loaded adapter: rank, alpha, scale (alpha / rank), the
    targets, the base it names, and {path: (a, b)} in our layout (zeros on halves without an
    adapter)."""
    rank: int
    alpha: float
    scale: float
    targets: tuple[str, ...]
    base: str | None
    factors: dict[str, tuple[np.ndarray, np.ndarray]]


def load_adapter(directory: str | os.PathLike, config: TransformerConfig) -> Adapter:
    """Reads a PEFT LoRA adapter for `config`'s model; raises ValueError naming what does not
    fit (another model's shapes, rank or targets, an unsupported PEFT option)."""
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise ValueError(f'{directory} is not a PEFT adapter: {name} is missing.')
    settings = json.loads((directory / CONFIG_FILE).read_text())
    _check_settings(settings, directory)
    rank, alpha = int(settings['r']), float(settings['lora_alpha'])
    targets = tuple(settings['target_modules'])
    check_targets(targets)
    tensors = load_file(str(directory / WEIGHTS_FILE))
    slots = {slot.module: slot for slot in target_slots(config, targets)}
    found: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None or match.group(3) not in targets:
            raise ValueError(f'{directory}: unexpected tensor {key} for targets {list(targets)}.')
        module = match.group(2)
        if module not in slots:
            if match.group(3) in ('k_proj', 'v_proj'):
                continue            # a KV-shared layer's k/v: never applied
            raise ValueError(f'{directory}: {key} names a module this model does not have.')
        found.setdefault(module, {})[match.group(4)] = value
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for module, slot in slots.items():
        pair = found.get(module, {})
        if set(pair) != {'A', 'B'}:
            raise ValueError(f'{directory}: the adapter of {module} is missing (targets '
                             f'{list(targets)}).')
        expected = ((rank, math.prod(slot.in_shape)), (math.prod(slot.out_shape), rank))
        shapes = (pair['A'].shape, pair['B'].shape)
        if shapes != expected:
            raise ValueError(f'{directory}: {module} has lora_A/lora_B shapes {shapes}, this '
                             f'model and rank {rank} need {expected}: an adapter of another '
                             'model or configuration.')
        a, b = from_peft(pair['A'].astype(np.float32), pair['B'].astype(np.float32), slot)
        if slot.stacked:
            a_all, b_all = factors.get(slot.path) or empty_factors(slot, rank)
            a_all[slot.half], b_all[slot.half] = a, b
            a, b = a_all, b_all
        factors[slot.path] = (a, b)
    return Adapter(rank, alpha, alpha / rank, targets, settings.get('base_model_name_or_path'), factors)


def empty_factors(slot: Slot, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero factors (a, b) of `slot`'s whole weight, every half included."""
    stack = slot.shape[:slot.stacked]
    return (np.zeros(stack + slot.in_shape + (rank,), np.float32),
            np.zeros(stack + (rank,) + slot.out_shape, np.float32))


def _check_settings(settings: dict[str, Any], directory: Path) -> None:
    if settings.get('peft_type') != 'LORA':
        raise ValueError(f'{directory}: a {settings.get("peft_type")} adapter; only LORA loads.')
    if not isinstance(settings.get('target_modules'), list):
        raise ValueError(f'{directory}: target_modules must be a list of module names '
                         f'({", ".join(LORA_TARGETS)}), not {settings.get("target_modules")!r}.')
    unsupported = [name for name in ('use_dora', 'use_rslora', 'fan_in_fan_out', 'modules_to_save',
                                     'rank_pattern', 'alpha_pattern', 'layers_to_transform')
                   if settings.get(name)]
    if unsupported or settings.get('bias', 'none') != 'none':
        raise ValueError(f'{directory}: unsupported PEFT option(s) '
                         f'{unsupported + (["bias"] if settings.get("bias", "none") != "none" else [])}.')
