"""A LoRA step of a bfloat16 model with our CPU kernels on and off, for tests of a kernel that
a training step takes (test_gemm.py, test_masked_rows.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gemma3n.layers import decode_kernels
from gemma3n.transformer import Gemma3nTransformer
from gemma3n.training.data import Example
from gemma3n.training.finetune import MODEL_KEYS
from gemma3n.training.lora import LoRA
from gemma3n.training.packing import Rows, TooLong
from gemma3n.training.step import TrainSteps
from hf_oracle import random_params

# A bfloat16 model's gradients move when any product rounds differently: one bf16 rounding in
# an activation is carried and amplified by the later layers. Measured between the many-row
# kernel and XLA: the same loss to 7 digits, adapter gradients 6e-4 apart in L2, cosine
# 1.000000. A wrong product (a transposed or shifted panel, a lost block) leaves nothing of that.
LOSS_RTOL, GRAD_L2_RTOL, GRAD_COSINE = 1e-3, 1e-2, 0.9999


def _long_batch(num_embed, length=96):
    rng = np.random.default_rng(5)
    examples = [Example(tokens=rng.integers(3, num_embed, size=n).astype(np.int32),
                        loss_mask=rng.random(n) < 0.7) for n in (40, 33, 23)]
    rows = Rows.from_examples(examples, length, pack=True, too_long=TooLong.TRUNCATE)
    return jax.tree.map(lambda a: a[None], rows.batch(np.arange(rows.num_rows)))


def lora_gradients(cfg, monkeypatch, switch, dtype=jnp.bfloat16):
    """(loss, every adapter gradient flattened, float64) of one LoRA step of `cfg` in `dtype`
    with `$GEMMA3N_KERNELS` = `switch`."""
    monkeypatch.setenv(decode_kernels.ENV, switch)
    model = Gemma3nTransformer(config=cfg, text_only=True, dtype=dtype, **MODEL_KEYS)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), random_params(cfg, seed=2))
    split = LoRA(cfg, rank=4, alpha=8.0)
    steps = TrainSteps(model, split, optax.sgd(0.0))
    trainable, frozen = split.split(params)
    trainable = jax.tree.map(lambda a: a + 0.05, trainable)    # B factors nonzero
    trainable, frozen = steps.place(trainable, dict(frozen))
    key = jax.random.key_data(jax.random.key(0))
    grads, loss, _ = steps.gradients(trainable, frozen, _long_batch(cfg.num_embed), key)
    return float(loss), np.concatenate([np.ravel(np.asarray(g, np.float64))
                                        for g in jax.tree.leaves(grads)])


def traced_calls(monkeypatch, module, name) -> list:
    """A list that grows by one each time `module.name` is called (traced)."""
    calls = []
    entry = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args: calls.append(1) or entry(*args))
    return calls


def relative_l2(ours, theirs):
    return np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)


def check_lora_step_with_and_without_kernels(cfg, monkeypatch, module, name):
    """A LoRA step of `cfg` in bfloat16 with the kernels ('avx512', by name: on a CPU with AMX
    'auto' leaves the dense products to XLA) and without ('off'): asserts
    that `module.name` (the kernel's entry) is traced only with them, and that loss and adapter
    gradients agree within the bounds above."""
    calls = traced_calls(monkeypatch, module, name)
    loss, ours = lora_gradients(cfg, monkeypatch, 'avx512')
    assert calls
    calls.clear()
    want_loss, theirs = lora_gradients(cfg, monkeypatch, 'off')
    assert not calls
    error = relative_l2(ours, theirs)
    cosine = ours @ theirs / np.linalg.norm(ours) / np.linalg.norm(theirs)
    print(f'kernels vs XLA: loss {loss:.6f} vs {want_loss:.6f}, gradients {error:.2e} off (L2), '
          f'cosine {cosine:.6f}')
    assert abs(loss - want_loss) <= LOSS_RTOL * abs(want_loss)
    assert error <= GRAD_L2_RTOL and cosine >= GRAD_COSINE
