"""LoRA equals peft's LoRA on transformers' Gemma 3n: adapter gradients, saved and loaded adapters.

Small random float32 config with KV-shared layers (which have no k/v weights here, and k/v
modules that peft wraps but never applies in transformers). Adapters get random nonzero B, so
every factor has a gradient and changes the logits.
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch

from gemma3n.checkpoints import peft_adapter
from gemma3n.checkpoints.flat_params import flatten_params, unflatten_params
from gemma3n.layers.einsum import (HEAD_TOKENS_FIRST_ROWS, TOKENS_FIRST_ROWS, ServingWeight,
                                    contract)
from gemma3n import layout
from gemma3n.layers.int8 import QuantizedWeight, quantize
from gemma3n.layers.lora import LoRAWeight
from gemma3n.layout import to_serving
from gemma3n.training import loss as loss_module
from gemma3n.training.keys import model_inputs
from gemma3n.training.lora import B_NAME, LoRA
from gemma3n.training.param_split import FullFineTuning
from gemma3n.training.step import TrainSteps
from gemma3n.transformer import Gemma3nTransformer
from hf_oracle import make_hf_causal_lm, small_configs
from test_layout import dequantized
from test_training_grads import GRAD_RTOL, hf_loss, hf_masks, training_case

RANK, ALPHA = 4, 8.0
# What peft calls the decoder inside a Gemma3nForCausalLM.
CAUSAL_LM_PEFT_PREFIX = 'base_model.model.model.'
# Logits of two float32 implementations of 10 layers agree to ~5e-5 of their scale
# (tests/test_model.py); a misplaced or mis-scaled adapter changes them by 1e-2 and more.
LOGIT_RTOL = 1e-4
# LoRA over an int8 base against peft over its dequantized float32 weights (section (b) of
# test_adapter_gradients_over_an_int8_base): loss, L2 error of all adapter gradients, cosine.
PEFT_INT8_LOSS_RTOL, PEFT_INT8_GRAD_RTOL, PEFT_INT8_COSINE = 1e-2, 0.5, 0.9


@pytest.fixture(scope='module')
def setup():
    return training_case(0, seed=3)


def nonzero_b(split, trainable, seed):
    """The trainable tree with random B factors, except on halves without an adapter."""
    key = jax.random.key(seed)
    flat = flatten_params(trainable)
    for index, (path, slots) in enumerate(split.slots().items()):
        b = 0.3 * jax.random.normal(jax.random.fold_in(key, index), flat[f'{path}/{B_NAME}'].shape)
        if slots[0].stacked:
            live = np.zeros(b.shape[0], bool)
            live[[slot.half for slot in slots]] = True
            b = b * live.reshape((-1,) + (1,) * (b.ndim - 1))
        flat[f'{path}/{B_NAME}'] = b
    return unflatten_params(flat)


def peft_model(cfg, params, targets, tensors=None):
    hf = make_hf_causal_lm(cfg, params)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                    target_modules=list(targets)))
    if tensors is not None:
        result = peft.set_peft_model_state_dict(
            model, {k: torch.from_numpy(v) for k, v in tensors.items()})
        assert not result.unexpected_keys
    return model


def our_logits(model, params, batch):
    return np.asarray(model.apply({'params': params}, **model_inputs(model, {'batch': batch})).logits)


def hf_logits(hf, batch, cfg):
    with torch.no_grad():
        return hf(input_ids=torch.from_numpy(batch['input']).long(),
                  position_ids=torch.from_numpy(batch['positions']).long(),
                  attention_mask=hf_masks(batch, cfg.sliding_window_size)).logits.numpy()


def relative(ours, reference):
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def test_adapter_gradients_equal_peft(setup):
    cfg, params, batch, model = setup
    targets = ('q_proj', 'k_proj', 'o_proj', 'up_proj', 'down_proj')    # halves: k, up only
    split = LoRA(cfg, rank=RANK, alpha=ALPHA, targets=targets)
    trainable, frozen = split.split(params)
    steps = TrainSteps(model, split, optax.sgd(0.0))
    # As a run holds it: the base re-laid out [out, in] (placing consumes it, hence a copy).
    trainable, frozen = steps.place(nonzero_b(split, trainable, seed=1), dict(frozen))
    assert isinstance(frozen['layer_0']['attn']['q_einsum']['w'], ServingWeight)
    # Products with a batch put the tokens first, the head's (a loss chunk's) from fewer rows.
    assert frozen['layer_0']['attn']['q_einsum']['w'].tokens_first_rows == TOKENS_FIRST_ROWS
    assert frozen['embedder']['input_embedding'].tokens_first_rows == HEAD_TOKENS_FIRST_ROWS
    grads, loss, _ = steps.gradients(trainable, frozen, jax.tree.map(lambda x: x[None], batch),
                                     jax.random.key_data(jax.random.key(0)))
    tensors = save_tensors(split, trainable, cfg)
    hf = peft_model(cfg, params, targets, tensors)
    reference = hf_loss(hf, cfg, batch)
    reference.backward()
    reference = float(reference.detach())
    assert abs(float(loss) - reference) <= GRAD_RTOL * abs(reference)
    hf_grads = {name.replace('.default', ''): p.grad.numpy()
                for name, p in hf.named_parameters() if p.grad is not None}
    ours = save_tensors(split, grads, cfg)
    # peft also wraps the KV-shared layers' unused k_proj: no gradient there, none of ours.
    assert set(ours) <= set(hf_grads)
    worst = max((relative(ours[name], hf_grads[name]), name) for name in ours)
    print(f'loss {float(loss):.6f} vs {reference:.6f}; worst adapter gradient {worst}')
    assert worst[0] <= GRAD_RTOL
    # The untargeted halves (v of kv_einsum, gate of gating_einsum) get exactly zero gradient.
    flat = split.factors(grads)
    assert not np.any(flat['layer_0/attn/kv_einsum/w'][0][1])
    assert not np.any(flat['layer_0/mlp/gating_einsum'][1][0])


def save_tensors(split, trainable, cfg):
    factors = split.factors(trainable)
    tensors = {}
    for slot in peft_adapter.target_slots(cfg, split.targets):
        a, b = peft_adapter.to_peft(*factors[slot.path], slot)
        tensors[f'{CAUSAL_LM_PEFT_PREFIX}{slot.module}.lora_A.weight'] = a
        tensors[f'{CAUSAL_LM_PEFT_PREFIX}{slot.module}.lora_B.weight'] = b
    return tensors


def test_saved_adapter_gives_peft_our_logits(setup, tmp_path):
    cfg, params, batch, model = setup
    split = LoRA(cfg, rank=RANK, alpha=ALPHA, targets=('v_proj', 'gate_proj', 'o_proj'))
    trainable, frozen = split.split(params)
    trainable = nonzero_b(split, trainable, seed=2)
    peft_adapter.save_adapter(tmp_path, split.factors(trainable), cfg, rank=RANK, alpha=ALPHA,
                              targets=split.targets, prefix=CAUSAL_LM_PEFT_PREFIX)
    hf = peft.PeftModel.from_pretrained(make_hf_causal_lm(cfg, params), tmp_path).eval()
    ours = our_logits(model, split.combine(trainable, frozen), batch)
    base = our_logits(model, params, batch)
    assert relative(ours, base) > 1e-2           # the adapter matters
    error = relative(ours, hf_logits(hf, batch, cfg))
    print(f'logits vs peft: {error:.2e}')
    assert error <= LOGIT_RTOL


def test_peft_adapter_loads_with_peft_logits(setup, tmp_path):
    cfg, params, batch, model = setup
    hf = make_hf_causal_lm(cfg, params)
    torch.manual_seed(0)
    # init_lora_weights=False: B random too, so the adapter changes the logits.
    made = peft.get_peft_model(hf, peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=list(peft_adapter.LORA_TARGETS),
        init_lora_weights=False))
    made.save_pretrained(tmp_path)
    adapter = peft_adapter.load_adapter(tmp_path, cfg)
    assert (adapter.rank, adapter.scale) == (RANK, ALPHA / RANK)
    split = LoRA(cfg, rank=adapter.rank, alpha=adapter.alpha, targets=adapter.targets,
                 initial=adapter.factors)
    trainable, frozen = split.split(params)
    ours = our_logits(model, split.combine(trainable, frozen), batch)
    error = relative(ours, hf_logits(made.eval(), batch, cfg))
    print(f'peft-made adapter, logits vs peft: {error:.2e}')
    assert error <= LOGIT_RTOL

    # Merged equals unmerged (float32 rounding of one sum per weight).
    merged = our_logits(model, split.export(trainable, frozen), batch)
    assert relative(merged, ours) <= 1e-5

    # An int8 base runs with the adapter: its rounding (activations too) moves the logits by a
    # few percent, the adapter by far more, so the run must sit near the float32 adapted model.
    serving_model, int8_params = to_serving(model, params, quantize_int8=True)
    int8_lora = our_logits(serving_model, split.combine(trainable, int8_params), batch)
    int8_base = our_logits(serving_model, int8_params, batch)
    print(f'int8 base: adapted vs float32 adapted {relative(int8_lora, ours):.2e}, '
          f'unadapted {relative(int8_base, ours):.2e}')
    assert relative(int8_lora, ours) < relative(int8_base, ours) / 3
    with pytest.raises(ValueError, match='merge into the checkpoint-order'):
        split.export(trainable, int8_params)


@flax.struct.dataclass
class StraightThroughOracle(QuantizedWeight):
    """An int8 leaf differentiated the textbook way, by plain autodiff: its forward is the int8
    product, its gradient that of the float32 einsum with the dequantized weight
    (dense + stop_gradient(int8 - dense))."""

    def contract(self, eqn, x):
        dense = jnp.einsum(eqn, x, dequantized(self), precision='highest')
        return dense + jax.lax.stop_gradient(super().contract(eqn, x) - dense)


def test_adapter_gradients_over_an_int8_base(setup, monkeypatch):
    cfg, params, batch, model = setup
    # At these widths most weights are under the size worth quantizing: here every projection
    # is int8 (the tied embedding and head too), so every product of the model is rounded.
    monkeypatch.setattr(layout, 'MIN_QUANTIZED_SIZE', 1)
    targets = ('q_proj', 'k_proj', 'o_proj', 'up_proj', 'down_proj')
    split = LoRA(cfg, rank=RANK, alpha=ALPHA, targets=targets, quantize='int8')
    trainable, frozen = split.split(params)
    steps = TrainSteps(model, split, optax.sgd(0.0))
    trainable, frozen = steps.place(nonzero_b(split, trainable, seed=1), dict(frozen))
    held = flatten_params(frozen)
    assert all(isinstance(held[path], QuantizedWeight) for path in split.slots())
    key = jax.random.key_data(jax.random.key(0))
    batch = jax.tree.map(lambda x: x[None], batch)
    grads, loss, _ = steps.gradients(trainable, frozen, batch, key)

    # (a) The same int8 forward differentiated by plain autodiff of the dequantized products:
    # the same gradients up to float32 summation order (GRAD_RTOL, as for two float32
    # implementations). Without the straight-through rule every adapter before the last layer
    # would get (almost) no gradient.
    oracle = unflatten_params({
        path: StraightThroughOracle(leaf.q, leaf.scale, leaf.order, leaf.scale_last)
        if isinstance(leaf, QuantizedWeight) else leaf for path, leaf in held.items()})
    want, want_loss, _ = steps.gradients(trainable, oracle, batch, key)
    assert abs(float(loss) - float(want_loss)) <= GRAD_RTOL * abs(float(want_loss))
    ours, reference = split.factors(grads), split.factors(want)
    worst = max((relative(ours[path][i], reference[path][i]), path, i)
                for path in ours for i in (0, 1))
    print(f'int8 base: loss {float(loss):.6f}; worst adapter gradient vs the autodiff oracle '
          f'{worst}')
    assert worst[0] <= GRAD_RTOL
    assert np.abs(ours['layer_0/attn/q_einsum/w'][0]).max() > 1e-3 * max(
        np.abs(g[0]).max() for g in ours.values())

    # (b) peft on the dequantized float32 weights: its activations are not rounded, ours are
    # (by up to half a step of 1/127 of each row's largest value, in every product of the 10
    # layers). The loss moves little (measured 0.46%), the gradients of this small random
    # model a lot: measured 0.33 off in L2, cosine 0.945. They are that sensitive to any
    # rounding: the float32 gradients alone, over the original weights against the
    # dequantized ones (a weight rounding of the same size), differ by 0.19 (cosine 0.98,
    # measured on this config without activation sparsity). Hence a bound, not a match: the
    # tight check is (a).
    tensors = save_tensors(split, trainable, cfg)
    base = unflatten_params({path: np.asarray(dequantized(leaf)) if isinstance(
        leaf, QuantizedWeight) else np.asarray(leaf) for path, leaf in held.items()})
    hf = peft_model(cfg, base, targets, tensors)
    hf_loss_value = hf_loss(hf, cfg, batch_of(batch))
    hf_loss_value.backward()
    hf_grads = {name.replace('.default', ''): p.grad.numpy()
                for name, p in hf.named_parameters() if p.grad is not None}
    ours = save_tensors(split, grads, cfg)
    names = sorted(ours)
    ours, theirs = (np.concatenate([g[name].ravel() for name in names]) for g in (ours, hf_grads))
    error = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
    cosine = float(ours @ theirs / np.linalg.norm(ours) / np.linalg.norm(theirs))
    loss_error = abs(float(loss) / float(hf_loss_value) - 1)
    print(f'int8 base vs peft on the dequantized weights: loss {loss_error:.2e} off; all '
          f'adapter gradients {error:.3f} off (L2), cosine {cosine:.4f}')
    assert loss_error <= PEFT_INT8_LOSS_RTOL
    assert error <= PEFT_INT8_GRAD_RTOL and cosine >= PEFT_INT8_COSINE


def batch_of(batch):
    """The one micro-batch of a step's batch [1, B, ...]."""
    return jax.tree.map(lambda x: np.asarray(x[0]), batch)


def test_bad_adapters_and_targets_are_refused(setup, tmp_path):
    cfg, params, _, _ = setup
    with pytest.raises(ValueError, match='unknown LoRA target.*q_proj, k_proj'):
        LoRA(cfg, targets=('qkv_proj',))
    split = LoRA(cfg, rank=RANK, alpha=ALPHA, targets=('q_proj',))
    trainable, _ = split.split(params)
    peft_adapter.save_adapter(tmp_path, split.factors(trainable), cfg, rank=RANK, alpha=ALPHA,
                              targets=('q_proj',))
    other = small_configs()[1]      # wider: every shape differs
    with pytest.raises(ValueError, match='another model or configuration'):
        peft_adapter.load_adapter(tmp_path, other)
    with pytest.raises(ValueError, match='not a PEFT adapter'):
        peft_adapter.load_adapter(tmp_path / 'missing', cfg)
    with pytest.raises(ValueError, match='initial adapter of .* has shapes'):
        LoRA(cfg, rank=RANK + 1, targets=('q_proj',),
             initial=peft_adapter.load_adapter(tmp_path, cfg).factors).split(params)
    assert isinstance(split.combine(trainable, params)['layer_0']['attn']['q_einsum']['w'],
                      LoRAWeight)


@pytest.mark.parametrize('quantized', [False, True])
def test_leaf_is_base_plus_low_rank_product(quantized):
    # kv_einsum's layout [2, K, D, H] with an adapter on the V half only; the base plain float32
    # or int8. The leaf must give exactly the base's own contraction plus scale·x·(a·b): float32
    # rounding of a few sums (~1e-6 relative).
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 3, 8, 4)).astype(np.float32)
    base = quantize(jnp.asarray(w.transpose(0, 1, 3, 2)), num_leading=3, order=(0, 1, 3, 2)) \
        if quantized else jnp.asarray(w)
    a = rng.standard_normal((2, 8, RANK)).astype(np.float32)
    b = rng.standard_normal((2, RANK, 3, 4)).astype(np.float32)
    a[0], b[0] = 0, 0
    leaf = LoRAWeight(base=base, a=jnp.asarray(a), b=jnp.asarray(b), scale=0.5, in_axes=(2,),
                      stacked=1)
    x = jnp.asarray(rng.standard_normal((2, 5, 8)).astype(np.float32))
    eqn = 'BSD,CKDH->CBSKH'
    expected = contract(eqn, x, base) + 0.5 * jnp.einsum(eqn, x, leaf.delta() / 0.5)
    got = contract(eqn, x, leaf)
    assert np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))
    assert np.array_equal(got[0], contract(eqn, x, base)[0])    # the K half: no adapter
    if not quantized:
        assert np.allclose(leaf.merge(), w + leaf.delta(), rtol=0, atol=1e-6)


def test_full_fine_tuning_refuses_quantized_weights():
    # Rounded values have no gradient: only a frozen base can be int8; frozen, it is accepted.
    params = {'mlp': {'w': quantize(jnp.ones((4, 8)), num_leading=1), 'scale': jnp.ones(4)}}
    with pytest.raises(ValueError, match='1 int8/int4 weights .*mlp/w.* cannot be fine-tuned'):
        FullFineTuning().split(params)
    trainable, frozen = FullFineTuning(freeze=('mlp/w',)).split(params)
    assert isinstance(frozen['mlp']['w'], QuantizedWeight) and 'w' not in trainable['mlp']


def test_a_lora_step_multiplies_the_frozen_table_as_stored(setup, monkeypatch):
    # Two loss chunks of HEAD_TOKENS_FIRST_ROWS rows: the head's product runs in a loop. Left to
    # loop-invariant code motion, XLA would hoist the table's canonical transposed copy out of
    # the loop and multiply that (`gemma3n.compiler_options.CPU_TRAINING_OPTIONS`).
    cfg, params, _, _ = setup
    rows = HEAD_TOKENS_FIRST_ROWS
    monkeypatch.setattr(loss_module, 'LOSS_CHUNK_BYTES', rows * cfg.num_embed * 4)
    model = Gemma3nTransformer(config=cfg, text_only=True, dtype=jnp.bfloat16,
                               tokens='batch.input')
    split = LoRA(cfg, rank=RANK, alpha=ALPHA)
    steps = TrainSteps(model, split, optax.sgd(0.0))
    trainable, frozen = steps.place(*split.split(jax.tree.map(jnp.asarray, params)))
    tokens = np.random.default_rng(0).integers(3, cfg.num_embed, (1, 1, 2 * rows + 1), np.int32)
    batch = {'input': tokens[..., :-1], 'target': tokens[..., 1:],
             'loss_mask': np.ones((1, 1, 2 * rows), bool)}
    hlo = steps.train.lower(steps.init(trainable, seed=0), frozen, batch).compile().as_text()
    heads = [line for line in hlo.splitlines() if ' dot(' in line and 'BTD,VD->BTV' in line]
    assert heads and all('rhs_contracting_dims={1}' in line for line in heads), heads
