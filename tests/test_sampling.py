"""Sampling methods, checked on fixed logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma3n import Greedy, RandomSampling, TopkSampling, TopPSampling

LOGITS = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
DRAWS = 4000


def draw(method, logits=LOGITS):
    batch = jnp.repeat(logits, DRAWS, axis=0)
    return np.asarray(method(batch, jax.random.key(1)))


def frequencies(tokens):
    return np.bincount(tokens, minlength=4) / len(tokens)


def test_greedy_and_degenerate_methods_pick_argmax():
    assert int(Greedy()(LOGITS, jax.random.key(0))[0]) == 0
    assert (draw(TopkSampling(k=1)) == 0).all()
    assert (draw(TopPSampling(p=0.01)) == 0).all()


def test_random_sampling_follows_softmax():
    freq = frequencies(draw(RandomSampling(temperature=1.0)))
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    sharp = frequencies(draw(RandomSampling(temperature=0.5)))   # p^2, renormalised
    np.testing.assert_allclose(sharp, np.array([25, 9, 2.25, 0.25]) / 36.5, atol=0.03)


def test_topk_renormalises_the_top_k():
    freq = frequencies(draw(TopkSampling(k=2)))
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)


def test_topp_keeps_the_nucleus():
    # 0.5 + 0.3 = 0.8 >= 0.7: the nucleus is the first two tokens.
    freq = frequencies(draw(TopPSampling(p=0.7)))
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)


@pytest.mark.parametrize('make', [lambda: RandomSampling(temperature=0),
                                  lambda: TopkSampling(k=0),
                                  lambda: TopPSampling(p=1.5)])
def test_bad_parameters_raise(make):
    with pytest.raises(ValueError):
        make()
