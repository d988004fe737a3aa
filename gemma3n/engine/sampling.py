"""How the next token is chosen from the model's logits.

A sampling method is called as `method(logits [B, V], rng) -> tokens [B]`. The methods with
fixed settings (`Greedy`, `RandomSampling`, ...) are static pytrees: inside the engine's
compiled functions their settings are constants, one program per method. `SlotSampling` holds
per-sequence settings as arrays, so sequences with different settings share one program (the
server's batch).
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gemma3n import validation

NO_TOP_K = 0        # SlotSampling.top_k: every token is a candidate
GREEDY_TEMPERATURE = 0.0   # SlotSampling.temperature: the most likely token, no draw


def _check_temperature(temperature: float) -> None:
    validation.check_real('temperature', temperature)
    # inf would flatten every distribution to uniform without a word.
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f'temperature must be > 0 and finite, got {temperature}.')


def _check_top_p(name: str, p: float) -> None:
    validation.check_real(name, p)
    if not 0 < p <= 1:
        raise ValueError(f'{name} must be in (0, 1], got {p}.')


def _nucleus(scaled: jax.Array, sorted_logits: jax.Array, candidates: jax.Array | bool,
             p: jax.Array | float) -> jax.Array:
    """scaled [B, V] with -inf outside the nucleus: the most likely of the `candidates` (by rank:
    [B, V] over `sorted_logits` [B, V], `scaled` sorted descending) whose probabilities among
    the candidates add up to `p` ([B, 1] or a number)."""
    probs = jax.nn.softmax(jnp.where(candidates, sorted_logits, -jnp.inf), axis=-1)
    # Keep a token if the mass strictly before it is below p (the top token always stays).
    keep = candidates & (jnp.cumsum(probs, axis=-1) - probs < p)
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


@jax.tree_util.register_static
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


@jax.tree_util.register_static
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


@jax.tree_util.register_static
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


@jax.tree_util.register_static
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
        _check_top_p('p', self.p)

    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        scaled = logits / self.temperature
        masked = _nucleus(scaled, jnp.sort(scaled, axis=-1)[:, ::-1], True, self.p)
        return jax.random.categorical(rng, masked, axis=-1).astype(jnp.int32)


@flax.struct.dataclass
class SlotSampling:
    """Per-sequence settings: row b is greedy when temperature[b] is 0, else a draw from
    softmax(logits / temperature[b]) among its top_k[b] most likely tokens (0: all) whose
    probabilities add up to top_p[b] (1: all).

    A row draws with its own key folded with its own token count, so its tokens depend on its
    seed and logits only, not on which other sequences share the batch. The `rng` of the call
    is not used.

    temperature: [B] float32; top_k: [B] int32; top_p: [B] float32;
    keys: [B, 2] uint32 raw keys (`jax.random.key_data`); counts: [B] int32 tokens drawn so far.

    Example:
        >>> rows = SlotSampling.of([(0.0, 0, 1.0, 7), (0.8, 40, 0.9, 8)], counts=[0, 3])
        >>> rows(logits, rng)                                   # [2]: row 0 greedy
    """
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    keys: jax.Array
    counts: jax.Array

    @classmethod
    def of(cls, settings: list[tuple[float, int, float, int]], counts: list[int]) -> SlotSampling:
        """From (temperature, top_k, top_p, seed) per row, checked as the methods check them."""
        for temperature, top_k, top_p, seed in settings:
            if temperature != GREEDY_TEMPERATURE:
                _check_temperature(temperature)
            validation.check_int('top_k', top_k, low=NO_TOP_K)
            _check_top_p('top_p', top_p)
            validation.check_int('seed', seed, low=0, high=validation.MAX_SEED_32)
        temperature, top_k, top_p, seeds = (np.array(column) for column in zip(*settings))
        keys = np.stack([np.asarray(jax.random.key_data(jax.random.key(int(s)))) for s in seeds])
        return cls(temperature=temperature.astype(np.float32), top_k=top_k.astype(np.int32),
                   top_p=top_p.astype(np.float32), keys=keys,
                   counts=np.asarray(counts, np.int32))

    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        """logits: [B, V] -> token ids [B]."""
        del rng
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        # The sort below costs far more than a step's argmax: skipped when every row is greedy.
        return jax.lax.cond(jnp.all(self.temperature == GREEDY_TEMPERATURE),
                            lambda: greedy, lambda: self._draw(logits, greedy))

    def _draw(self, logits: jax.Array, greedy: jax.Array) -> jax.Array:
        drawing = self.temperature != GREEDY_TEMPERATURE
        scaled = logits / jnp.where(drawing, self.temperature, 1.0)[:, None]
        sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
        rank = jnp.arange(logits.shape[-1])[None, :]
        in_top_k = (self.top_k[:, None] == NO_TOP_K) | (rank < self.top_k[:, None])
        masked = _nucleus(scaled, sorted_logits, in_top_k, self.top_p[:, None])
        keys = jax.vmap(lambda key, count: jax.random.fold_in(
            jax.random.wrap_key_data(key), count))(self.keys, self.counts)
        drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, masked)
        return jnp.where(drawing, drawn.astype(jnp.int32), greedy)


SamplingMethod = Greedy | RandomSampling | TopkSampling | TopPSampling | SlotSampling


def first_rows(method: SamplingMethod, rows: int) -> SamplingMethod:
    """The method for the first `rows` sequences of a batch: a `SlotSampling`'s first rows; a
    method with fixed settings applies to any rows as it is."""
    if isinstance(method, SlotSampling):
        return jax.tree.map(lambda x: x[:rows], method)
    return method
