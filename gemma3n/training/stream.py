"""An endless, reproducible stream of training batches, resumable from a position.

Pass e over the data shuffles the examples with the seed (seed, e) and turns them into rows
(`Rows.from_examples`); the stream is the rows of pass 0, then of pass 1, and so on, cut into
batches. Its position is the number of rows handed out, so a resumed run that restores the
position gets exactly the batches the interrupted run would have had.

Example:
    >>> stream = BatchStream(examples, seq_len=512, batch_size=8, seed=0)
    >>> batch = stream.next_batch()       # fields [8, 512], attention_mask [8, 512, 512]
    >>> stream.position                   # 8
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gemma3n.training.data import Example
from gemma3n.training.packing import Rows, TooLong


class BatchStream:
    """Batches of `batch_size` rows of length `seq_len` from `examples`, endlessly."""

    def __init__(self, examples: Sequence[Example], *, seq_len: int, batch_size: int, seed: int,
                 pack: bool = True, too_long: TooLong = TooLong.TRUNCATE, shuffle: bool = True,
                 position: int = 0):
        self._examples = list(examples)
        self._options = dict(seq_len=seq_len, pack=pack, too_long=too_long)
        self._seed, self._shuffle = seed, shuffle
        self.batch_size = batch_size
        self.position = position
        self._pass_index, self._pass_start, self._rows = 0, 0, self._rows_of_pass(0)
        # Packing depends on the order only through which examples share a row: every pass
        # truncates and skips the same examples.
        self.truncated, self.skipped = self._rows.truncated, self._rows.skipped

    def _rows_of_pass(self, index: int) -> Rows:
        order = np.arange(len(self._examples))
        if self._shuffle:
            order = np.random.default_rng([self._seed, index]).permutation(order)
        return Rows.from_examples([self._examples[i] for i in order], **self._options)

    def _rows_at(self, position: int) -> tuple[Rows, int]:
        """The rows of the pass holding stream row `position`, and its index in them.

        Passes may differ in length (packing depends on the order), so they are walked in order
        from the cached one (from the first when `position` lies before it).
        """
        if position < self._pass_start:
            self._pass_index, self._pass_start = 0, 0
            self._rows = self._rows_of_pass(0)
        while position >= self._pass_start + self._rows.num_rows:
            self._pass_start += self._rows.num_rows
            self._pass_index += 1
            self._rows = self._rows_of_pass(self._pass_index)
        return self._rows, position - self._pass_start

    def next_batch(self) -> dict[str, np.ndarray]:
        """The next `batch_size` rows as a batch (see `Rows.batch`); advances the position."""
        parts = []
        for position in range(self.position, self.position + self.batch_size):
            rows, index = self._rows_at(position)
            parts.append(rows.batch(np.array([index])))
        self.position += self.batch_size
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
