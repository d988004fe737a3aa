"""Fine-tuning gradients equal transformers' autograd: loss and every weight's gradient.

A small random float32 config with KV-shared and sparse layers (tests/hf_oracle.py's first;
tests/test_model.py compares the forward pass of the others); a packed batch of several
examples per row (attention kept inside each example, per-example positions, padding), so the
mask, the positions and the loss mask all take part. The same weights are mapped into
`Gemma3nForCausalLM` (tests/hf_oracle.py); its loss is written out in torch from its logits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from gemma3n.checkpoints.hf_mapping import params_to_hf
from gemma3n.layers.einsum import contract
from gemma3n.transformer import Gemma3nTransformer
from gemma3n.training import loss, step
from gemma3n.training.data import Example
from gemma3n.training.finetune import MODEL_KEYS
from gemma3n.training.packing import Rows, TooLong
from gemma3n.training.param_split import FullFineTuning
from gemma3n.training.step import TrainSteps
from hf_oracle import HF_PREFIX, make_hf_causal_lm, random_params, small_configs

SEQ_LEN = 24
ROWS = 2
# Relative bound of the loss and of each weight's gradient (its max |difference| over its max
# |value|). Float32 rounding in a different order, amplified through 10-15 layers of norms,
# gives ~1e-5 on these models (logits agree to ~5e-5, tests/test_model.py); a wrong mask,
# position or missing term changes gradients by 1e-2 and more.
GRAD_RTOL = 1e-4
RNG = np.asarray(jax.random.key_data(jax.random.key(0)))     # the step's (unused) dropout key


def packed_batch(num_embed: int, seed: int) -> dict[str, np.ndarray]:
    """Two rows, each packing examples of 5-13 tokens (loss on a random part), then padding."""
    rng = np.random.default_rng(seed)
    examples = []
    for length in (9, 13, 7, 11, 5):
        tokens = rng.integers(3, num_embed, size=length).astype(np.int32)
        mask = rng.random(length) < 0.7
        examples.append(Example(tokens=tokens, loss_mask=mask))
    rows = Rows.from_examples(examples, SEQ_LEN, pack=True, too_long=TooLong.TRUNCATE)
    assert rows.num_rows == ROWS and (rows.fields['segment'] == 0).any()
    return rows.batch(np.arange(ROWS))


def training_case(config_index: int, seed: int):
    """(config, random weights, packed batch, the float32 model reading the batch by key) of
    small config `config_index`, weights and batch drawn with `seed`."""
    cfg = small_configs()[config_index]
    model = Gemma3nTransformer(config=cfg, text_only=True, dtype=jnp.float32, **MODEL_KEYS)
    return cfg, random_params(cfg, seed=seed), packed_batch(cfg.num_embed, seed=seed), model


def hf_masks(batch: dict[str, np.ndarray], window: int) -> dict[str, torch.Tensor]:
    """HF's per-layer-type additive masks [B, 1, L, L] for our packed batch."""
    allowed = batch['attention_mask']
    positions = batch['positions']
    near = (positions[:, :, None] - positions[:, None, :]) < window
    minimum = torch.finfo(torch.float32).min

    def additive(mask):
        return torch.where(torch.from_numpy(mask)[:, None], 0.0, minimum)
    return {'full_attention': additive(allowed), 'sliding_attention': additive(allowed & near)}


def hf_loss(hf, cfg, batch) -> torch.Tensor:
    """The mean masked loss of `hf` (a Gemma3nForCausalLM, or a peft model around one)."""
    logits = hf(input_ids=torch.from_numpy(batch['input']).long(),
                position_ids=torch.from_numpy(batch['positions']).long(),
                attention_mask=hf_masks(batch, cfg.sliding_window_size)).logits
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.from_numpy(batch['target']).long().reshape(-1),
        reduction='none')
    mask = torch.from_numpy(batch['loss_mask']).reshape(-1).float()
    return (losses * mask).sum() / mask.sum()


def hf_loss_and_grads(cfg, params, batch):
    hf = make_hf_causal_lm(cfg, params)
    loss = hf_loss(hf, cfg, batch)
    loss.backward()
    grads = {name: (np.zeros(p.shape, np.float32) if p.grad is None else p.grad.numpy())
             for name, p in hf.named_parameters()}
    return float(loss.detach()), grads


LOSS_CHUNK_POSITIONS = 5

@pytest.fixture(scope='module')
def setup():
    """Config 0 (KV-shared and sparse layers), its weights, a packed batch, the model reading
    the batch by keys, and our gradients of that batch in one micro-batch: one compiled
    program, which both tests below compare against."""
    cfg, params, batch, model = training_case(0, seed=0)
    split = FullFineTuning()
    trainable, frozen = split.split(params)
    rows, length = batch['input'].shape
    # The loss in chunks of 5 positions (the last one padded): the unembedding's gradient is
    # summed over chunks, the hidden states' put back together.
    assert length % LOSS_CHUNK_POSITIONS
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loss, 'LOSS_CHUNK_BYTES', LOSS_CHUNK_POSITIONS * rows * cfg.num_embed * 4)
        gradients = TrainSteps(model, split, optax.sgd(0.0)).gradients(
            trainable, frozen, jax.tree.map(lambda x: x[None], batch), RNG)
    return cfg, params, batch, model, gradients


def test_loss_and_every_gradient_equal_transformers(setup):
    cfg, params, batch, _, (grads, loss, count) = setup
    hf_loss, hf_grads = hf_loss_and_grads(cfg, params, batch)

    assert int(count) == int(batch['loss_mask'].sum())
    assert abs(float(loss) - hf_loss) <= GRAD_RTOL * abs(hf_loss)
    ours = params_to_hf(jax.tree.map(np.asarray, grads), cfg, prefix=HF_PREFIX,
                        hf_vocab_size=cfg.num_embed)
    assert set(ours) <= set(hf_grads)
    # What HF has beyond our tree is the tied head: it holds no gradient of its own.
    assert all(not np.any(hf_grads[name]) for name in set(hf_grads) - set(ours)
               if name != 'lm_head.weight')
    worst = {}
    for name, ours_grad in ours.items():
        scale = np.max(np.abs(hf_grads[name]))
        assert scale > 0, f'{name}: transformers gives no gradient'
        worst[name] = float(np.max(np.abs(ours_grad - hf_grads[name])) / scale)
    name = max(worst, key=worst.get)
    print(f'loss {float(loss):.6f} vs {hf_loss:.6f}; worst gradient {name}: {worst[name]:.2e}')
    assert worst[name] <= GRAD_RTOL, (name, worst[name])


def test_accumulated_rematerialised_gradients_equal_the_plain_ones(setup):
    # Two micro-batches of one row, blocks rematerialised, against one batch of two rows: the
    # same sums in another order, float32 rounding amplified as in the parity test (~2e-5 of a
    # weight's largest gradient, measured). The rows hold different numbers of target tokens, so
    # a mean taken per micro-batch instead of over the batch would be off by 10% and more.
    _, params, batch, model, plain = setup
    split = FullFineTuning()
    trainable, frozen = split.split(params)
    accumulated = TrainSteps(model.clone(remat=True), split, optax.sgd(0.0)).gradients(
        trainable, frozen, jax.tree.map(lambda x: x[:, None], batch), RNG)
    assert int(batch['loss_mask'][0].sum()) != int(batch['loss_mask'][1].sum())
    for ours, reference in zip(jax.tree.leaves(accumulated), jax.tree.leaves(plain)):
        assert np.max(np.abs(ours - reference)) <= GRAD_RTOL * np.max(np.abs(reference))


def test_a_micro_batch_in_passes_of_a_row_gives_the_plain_gradients(setup):
    # One micro-batch of two rows in passes of at most SEQ_LEN tokens: one row a pass, whose
    # sums add up as accumulated micro-batches do (the bound above). Rows or fields mixed up
    # between passes change the loss's terms, and gradients by far more.
    _, params, batch, model, plain = setup
    split = FullFineTuning()
    trainable, frozen = split.split(params)
    steps = TrainSteps(model, split, optax.sgd(0.0), pass_tokens=SEQ_LEN)
    in_passes = steps.gradients(trainable, frozen, jax.tree.map(lambda x: x[None], batch), RNG)
    for ours, reference in zip(jax.tree.leaves(in_passes), jax.tree.leaves(plain)):
        assert np.max(np.abs(ours - reference)) <= GRAD_RTOL * np.max(np.abs(reference))


@pytest.mark.parametrize('rows, row_tokens, pass_tokens, rows_a_pass', [
    (4, 512, 512, 1), (4, 512, 1024, 2), (4, 512, 100, 1), (6, 100, 250, 2), (6, 100, 600, 6),
    (5, 100, 400, 1)])
def test_row_passes_cut_each_micro_batch_into_the_fewest_passes(rows, row_tokens, pass_tokens,
                                                                rows_a_pass):
    k = 2
    batch = {'input': np.arange(k * rows * 3).reshape(k, rows, 3),
             'images': np.arange(k * rows * 4).reshape(k, rows, 2, 2)}
    passes = step.row_passes(batch, row_tokens, pass_tokens)
    for name, x in batch.items():
        assert passes[name].shape == (k * rows // rows_a_pass, rows_a_pass) + x.shape[2:]
        # Each pass holds consecutive rows of one micro-batch, in order.
        np.testing.assert_array_equal(passes[name].reshape(x.shape), x)


@pytest.mark.parametrize('eqn, x_shape, w_shape', [
    ('BTD,CFD->CBTF', (2, 5, 16), (2, 24, 16)),       # the FFN's stacked gate and up
    ('BTNH,NHD->BTD', (2, 5, 4, 8), (4, 8, 16)),      # the attention output, two axes read
])
def test_bfloat16_products_differentiate_as_the_float32_product(eqn, x_shape, w_shape):
    # bfloat16 training computes each product's backward in bfloat16 x bfloat16 with float32
    # accumulation (gemma3n.layers.einsum's _bf16_dot). On bfloat16-valued inputs its
    # gradients must equal float32 autodiff's up to the one rounding of each result to
    # bfloat16 (2^-8 relative); a wrong axis or operand gives O(1) differences.
    rng = np.random.default_rng(0)
    x, w, r = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
               for s in (x_shape, w_shape, jnp.einsum(eqn, np.ones(x_shape), np.ones(w_shape)).shape))

    def loss(x, w):
        return jnp.sum(contract(eqn, x, w).astype(jnp.float32) * r.astype(jnp.float32))

    ours = jax.grad(loss, argnums=(0, 1))(x, w)
    reference = jax.grad(loss, argnums=(0, 1))(x.astype(jnp.float32), w.astype(jnp.float32))
    for got, expected in zip(ours, reference):
        assert got.dtype == jnp.bfloat16
        error = np.max(np.abs(np.asarray(got, np.float32) - expected)) / np.max(np.abs(expected))
        assert error <= 2 ** -8, error
