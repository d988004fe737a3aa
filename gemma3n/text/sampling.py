"""How the next token is chosen from the model's logits."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from gemma3n import validation


def _check_temperature(temperature: float) -> None:
    validation.check_real('temperature', temperature)
    # inf would flatten every distribution to uniform without a word.
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f'temperature must be > 0 and finite, got {temperature}.')


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Always the most likely token.

    Example:
        >>> Greedy()(jnp.array([[0.1, 2.0, -1.0]]), jax.random.key(0))
        Array([1], dtype=int32)
    """

    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        """logits: [B, V] -> token ids [B]."""
        del rng
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class RandomSampling:
    """A draw from softmax(logits / temperature).

    Example:
        >>> RandomSampling(temperature=0.7)(logits, jax.random.key(0))   # [B]
    """
    temperature: float = 1.0

    def __post_init__(self):
        _check_temperature(self.temperature)

    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        return jax.random.categorical(rng, logits / self.temperature, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopkSampling:
    """A draw among the k most likely tokens, at a temperature.

    Example:
        >>> TopkSampling(k=40, temperature=0.8)(logits, jax.random.key(0))   # [B]
    """
    k: int = 40
    temperature: float = 1.0

    def __post_init__(self):
        _check_temperature(self.temperature)
        validation.check_int('k', self.k, low=1)

    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        top_logits, top_ids = jax.lax.top_k(logits, min(self.k, logits.shape[-1]))
        choice = jax.random.categorical(rng, top_logits / self.temperature, axis=-1)
        return jnp.take_along_axis(top_ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopPSampling:
    """Nucleus sampling: a draw among the most likely tokens whose probabilities add up to p.

    Example:
        >>> TopPSampling(p=0.9, temperature=0.8)(logits, jax.random.key(0))   # [B]
    """
    p: float = 0.9
    temperature: float = 1.0

    def __post_init__(self):
        _check_temperature(self.temperature)
        validation.check_real('p', self.p)
        if not 0 < self.p <= 1:
            raise ValueError(f'p must be in (0, 1], got {self.p}.')

    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        scaled = logits / self.temperature
        sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token if the mass strictly before it is below p (the top token always stays).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < self.p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        masked = jnp.where(scaled >= threshold, scaled, -jnp.inf)
        return jax.random.categorical(rng, masked, axis=-1).astype(jnp.int32)


SamplingMethod = Greedy | RandomSampling | TopkSampling | TopPSampling
