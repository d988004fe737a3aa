"""A batch of slots in one KV cache: sequences of their own lengths, decoded together.

Each of the S slots holds one sequence (or none). A slot's prompt is prefilled into it alone
(`admit`), while the other slots keep their state; `step` then decodes every active slot at
once, feeding the inactive ones padding, which the model neither writes into the cache nor
counts as a position. A finished slot is freed for the next sequence (`free`). The cache keeps
each slot's length (`end_index` [S]), so slots at different lengths need no alignment.

The `Sampler`'s lock-step batch is the same thing with every slot filled at once (`fill`) and
slots leaving as their sequences stop (`finish`); the server admits and frees slots between
steps (continuous batching).

With `occupied_only` a step computes only the first rows of the cache, as many as cover the
last active slot, rounded up to a power of two (`Engine.step_rows`): a step's cost follows the
number of sequences, not the number of slots, and the batch compiles at most log2(S) + 1 step
programs, each when first needed. Its user keeps the sequences at the low slots: a free slot is
filled lowest first, and a hole left below others is filled by moving the last one down
(`move`), which costs one call once instead of the extra rows at every later step.

Example:
    >>> batch = Batch(engine, engine.new_cache(4, cache_length=256))
    >>> token, _ = batch.admit(0, rows[0], key, Greedy())      # slot 0 starts
    >>> tokens, _ = batch.step(key, Greedy())                   # [4]: PAD for empty slots
    >>> token, _ = batch.admit(1, rows[1], key, Greedy())      # joins between steps
    >>> batch.free(0)                                           # slot 0 is free again
    >>> batch.move(1, 0)                                        # slot 1's sequence now in 0
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from gemma3n import cache as kv_cache
from gemma3n.engine.engine import Engine
from gemma3n.engine.sampling import SamplingMethod, first_rows
from gemma3n.layers.special_ids import PAD


class Batch:
    """S slots of one KV cache (see the module docstring).

    cache: the KV cache, batch S.
    pending: [S] each slot's last sampled token, fed at the next step (not in the cache yet).
    active: [S] the slots that decode at the next step.
    occupied_only: a step computes only the rows that cover the active slots (else all S).
    """

    def __init__(self, engine: Engine, cache: kv_cache.Cache, pending: Any = None, *,
                 occupied_only: bool = False):
        self.engine = engine
        self.cache = cache
        self.occupied_only = occupied_only
        size = cache[kv_cache.END_INDEX].shape[0]
        self.pending = (np.zeros(size, np.int32) if pending is None
                        else np.array(pending, np.int32))
        self.active = np.zeros(size, bool)

    @property
    def size(self) -> int:
        return len(self.active)

    def lengths(self) -> np.ndarray:
        """[S] positions each slot's sequence holds in the cache (the pending token excluded)."""
        return np.asarray(self.cache[kv_cache.END_INDEX])

    def fill(self, rows: list[np.ndarray], rng: jax.Array, sampling: SamplingMethod,
             images: jax.Array | None = None, audio: Any = None) -> tuple[np.ndarray, jax.Array]:
        """Prefills rows[b] into slot b for every slot at once; all become active.

        Returns the first tokens [S] and the logits they came from [S, V].
        """
        token, logits, self.cache = self.engine.prefill(rows, self.cache, rng, images, sampling,
                                                        audio=audio)
        self.active[:] = True
        return self._sampled(token), logits

    def admit(self, slot: int, row: np.ndarray, rng: jax.Array, sampling: SamplingMethod,
              images: jax.Array | None = None) -> tuple[int, jax.Array]:
        """Prefills one prompt [L] (images [1, N, H, W, C]) into the free `slot`, which becomes
        active; the others keep their state. Returns its first token and logits [V]."""
        if self.active[slot]:
            raise ValueError(f'slot {slot} holds an active sequence: free it first.')
        token, logits, self.cache = self.engine.prefill(
            [row], self.cache, rng, images, sampling, slot=slot)
        token = int(np.asarray(token)[0])
        self.pending[slot] = token
        self.active[slot] = True
        return token, logits[0]

    def step_rows(self) -> int:
        """The number of rows R the next step computes: all S, or with `occupied_only` the
        power of two covering the last active slot (`Engine.step_rows`)."""
        if not self.occupied_only:
            return self.size
        active = np.flatnonzero(self.active)
        return self.engine.step_rows(int(active[-1]) + 1 if active.size else 1, self.size)

    def step(self, rng: jax.Array, sampling: SamplingMethod) -> tuple[np.ndarray, jax.Array]:
        """Feeds each active slot its pending token and samples the next one.

        sampling: a method for all S slots (a `SlotSampling` of S rows).
        Returns tokens [S] (PAD for inactive slots, whose cache is unchanged) and logits [R, V]
        of the first R = `step_rows()` slots.
        """
        rows = self.step_rows()
        fed = np.where(self.active, self.pending, PAD).astype(np.int32)[:rows]
        token, logits, self.cache = self.engine.step(fed, self.cache, rng,
                                                     first_rows(sampling, rows))
        return self._sampled(token), logits

    def _sampled(self, token: jax.Array) -> np.ndarray:
        """Tokens [S] from a call's tokens for the first R <= S slots."""
        computed = np.full(self.size, PAD, np.int32)
        computed[:len(token)] = np.asarray(token)
        new = np.where(self.active, computed, PAD).astype(np.int32)
        self.pending = np.where(self.active, new, self.pending)
        return new

    def finish(self, slot: int) -> None:
        """The slot stops decoding; its sequence stays in the cache (to be continued)."""
        self.active[slot] = False

    def free(self, slot: int) -> None:
        """The slot stops decoding and is emptied for another sequence."""
        self.active[slot] = False
        self.pending[slot] = PAD
        self.cache = self.engine.free_slot(self.cache, slot)

    def move(self, source: int, target: int) -> None:
        """Moves the sequence of slot `source` (its cache, pending token and state) into the
        free slot `target`; `source` is then free."""
        if self.active[target] or self.lengths()[target]:
            raise ValueError(f'slot {target} holds a sequence: free it first.')
        self.cache = self.engine.move_slot(self.cache, source, target)
        self.active[target], self.pending[target] = self.active[source], self.pending[source]
        self.active[source], self.pending[source] = False, PAD
