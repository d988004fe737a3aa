"""LoRA equals peft's LoRA on transformers' Gemma 3n: adapter gradients, saved and loaded adapters.

Small random float32 config with KV-shared layers (which have no k/v weights here, and k/v
modules that peft wraps but never applies in transformers). Adapters get random nonzero B, so
every factor has a gradient and changes the logits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch

from gemma3n.checkpoints import peft_adapter
from gemma3n.checkpoints.flat_params import flatten_params, unflatten_params
from gemma3n.layers.einsum import ServingWeight, contract
from gemma3n.layers.int8 import quantize
from gemma3n.layers.lora import LoRAWeight
from gemma3n.layout import to_serving
from gemma3n.training.keys import model_inputs
from gemma3n.training.lora import B_NAME, LoRA
from gemma3n.training.step import TrainSteps
from hf_oracle import make_hf_causal_lm, small_configs
from test_training_grads import GRAD_RTOL, hf_loss, hf_masks, training_case

RANK, ALPHA = 4, 8.0
# What peft calls the decoder inside a Gemma3nForCausalLM.
CAUSAL_LM_PEFT_PREFIX = 'base_model.model.model.'
# Logits of two float32 implementations of 10 layers agree to ~5e-5 of their scale
# (tests/test_model.py); a misplaced or mis-scaled adapter changes them by 1e-2 and more.
LOGIT_RTOL = 1e-4


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
    # Training over it is refused before any step: the rounded activations have no gradient.
    with pytest.raises(ValueError, match='int8/int4 base is not supported'):
        TrainSteps(model, split, optax.sgd(0.0)).place(trainable, int8_params)


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
