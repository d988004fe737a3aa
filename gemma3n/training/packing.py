"""Examples -> fixed-length rows: packed (several conversations per row) or one per row, padded.

A row of length L holds, per position t: `input` (the token), `target` (the next token of the
same example), `loss_mask` (the target counts), `positions` (counted from 0 in each example)
and `segment` (which example of the row, 0 for padding). Packed rows keep attention inside each
example through the model's `attention_mask` input: query t sees key s iff both are in the same
example and s <= t. Padding (token 0) sees only itself, so no softmax row is empty.

Example:
    >>> rows = Rows.from_examples(examples, seq_len=512, pack=True, too_long=TooLong.TRUNCATE)
    >>> batch = rows.batch(np.array([0, 1]))      # {'input': [2, 512], ..., 'attention_mask': [2, 512, 512]}
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

import numpy as np

from gemma3n.layers import special_ids
from gemma3n.training.data import DataError, Example

ROW_FIELDS = ('input', 'target', 'loss_mask', 'positions', 'segment')
PADDING_SEGMENT = 0


class TooLong(enum.Enum):
    """What to do with an example longer than a row."""
    TRUNCATE = 'truncate'   # keep its first tokens
    SKIP = 'skip'           # leave it out


@dataclasses.dataclass(frozen=True)
class Rows:
    """Rows of one pass over the data: each field [num_rows, L]; `truncated`/`skipped` count
    the examples that were longer than a row."""
    fields: dict[str, np.ndarray]
    truncated: int
    skipped: int

    @property
    def num_rows(self) -> int:
        return self.fields['input'].shape[0]

    @staticmethod
    def from_examples(examples: Sequence[Example], seq_len: int, *, pack: bool,
                      too_long: TooLong) -> Rows:
        """Rows of `examples` in their order; DataError when none is left to train on."""
        pieces, truncated, skipped = [], 0, 0
        for example in examples:
            length = len(example.tokens) - 1          # input/target pairs of the example
            if length > seq_len:
                if too_long == TooLong.SKIP:
                    skipped += 1
                    continue
                truncated += 1
                length = seq_len
            if not example.loss_mask[1:length + 1].any():
                skipped += 1                          # truncation cut all it had to learn
                continue
            pieces.append((example, length))
        if not pieces:
            raise DataError(f'no example is left to train on with sequence length {seq_len} '
                            f'({skipped} skipped)')
        layout = _pack(pieces, seq_len) if pack else [[piece] for piece in pieces]
        fields = {name: np.zeros((len(layout), seq_len), np.int32) for name in ROW_FIELDS}
        fields['input'][:] = special_ids.PAD
        for row, row_pieces in enumerate(layout):
            start = 0
            for segment, (example, length) in enumerate(row_pieces, start=1):
                span = slice(start, start + length)
                fields['input'][row, span] = example.tokens[:length]
                fields['target'][row, span] = example.tokens[1:length + 1]
                fields['loss_mask'][row, span] = example.loss_mask[1:length + 1]
                fields['positions'][row, span] = np.arange(length)
                fields['segment'][row, span] = segment
                start += length
        return Rows(fields=fields, truncated=truncated, skipped=skipped)

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The rows at `indices` [*B] as model inputs: each field [*B, L], `loss_mask` bool and
        `attention_mask` bool [*B, L, L]."""
        batch = {name: self.fields[name][indices] for name in ROW_FIELDS if name != 'segment'}
        batch['loss_mask'] = batch['loss_mask'].astype(bool)
        batch['attention_mask'] = attention_mask(self.fields['segment'][indices])
        return batch


def attention_mask(segment: np.ndarray) -> np.ndarray:
    """segment int [*B, L] -> bool [*B, L, L]: causal within each segment; padding sees itself."""
    length = segment.shape[-1]
    causal = np.tril(np.ones((length, length), bool))
    same = segment[..., :, None] == segment[..., None, :]
    real = segment[..., :, None] != PADDING_SEGMENT
    return (same & causal & real) | np.eye(length, dtype=bool)


def _pack(pieces: list[tuple[Example, int]], seq_len: int) -> list[list[tuple[Example, int]]]:
    """Fills rows in order, starting a new row when the next example does not fit."""
    rows: list[list[tuple[Example, int]]] = [[]]
    used = 0
    for piece in pieces:
        if used + piece[1] > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(piece)
        used += piece[1]
    return rows
