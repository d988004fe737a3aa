"""The layout conversions between one of our parameters and its Hugging Face tensor(s).

`checkpoints.hf_mapping` names, for each parameter, the conversion its HF tensors need; this
module holds each conversion once, by name: the HF shapes it produces from our shape, and the
two directions. Conversions are plain numpy transposes and reshapes, bit-exact both ways;
`from_hf` returns views of its inputs where the layout allows (the caller materialises once, in
the target dtype).

Example:
    >>> conversion = CONVERSIONS['heads_in']                      # q_einsum [N, D, H]
    >>> hf_shapes = conversion.hf_shapes((8, 2048, 256), 1, 262400)   # ((2048, 2048),)
    >>> (q_proj,) = conversion.to_hf(w, (8, 2048, 256), hf_shapes)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from gemma3n.layers.special_ids import PAD

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Conversion:
    """One layout change. `hf_shapes(shape, num_keys, hf_vocab_size)`: the HF tensors' shapes
    for our `shape`; `to_hf(x, shape, hf_shapes)`: one array per HF key; `from_hf(xs, shape)`:
    our layout, one array or (stacked parameters) a list of its slices along axis 0."""
    hf_shapes: Callable[[Shape, int, int], tuple[Shape, ...]]
    to_hf: Callable[[np.ndarray, Shape, tuple[Shape, ...]], tuple[np.ndarray, ...]]
    from_hf: Callable[[Sequence[np.ndarray], Shape], np.ndarray | list[np.ndarray]]


def _heads_in_to_hf(x: np.ndarray, hf_shape: Shape) -> np.ndarray:
    # [N, D, H] contracts D in the middle: go through [N, H, D] so rows are heads-major (n*H + h).
    return x.transpose(0, 2, 1).reshape(hf_shape)


def _heads_in_from_hf(x: np.ndarray, shape: Shape) -> np.ndarray:
    n, d, h = shape
    return x.reshape(n, h, d).transpose(0, 2, 1)


def _pad_vocab_to_hf(x: np.ndarray, shape: Shape, hf_shapes: tuple[Shape, ...]) -> tuple[np.ndarray]:
    extra = hf_shapes[0][0] - shape[0]
    # The released checkpoints fill the extra rows with copies of the pad row.
    return (np.concatenate([x, np.broadcast_to(x[PAD], (extra,) + x.shape[1:])]),)


CONVERSIONS: dict[str, Conversion] = {
    'identity': Conversion(lambda s, n, vocab: (s,), lambda x, s, hf: (x,), lambda xs, s: xs[0]),
    'transpose': Conversion(lambda s, n, vocab: (s[::-1],), lambda x, s, hf: (x.T,),
                            lambda xs, s: xs[0].T),
    'reshape': Conversion(lambda s, n, vocab: ((s[0], math.prod(s[1:])),),
                          lambda x, s, hf: (x.reshape(hf[0]),), lambda xs, s: xs[0].reshape(s)),
    # [a, b, c] -> [b*c, a]: per-layer input projection [D, L, P], AltUp prediction coefs [M, A, A].
    'flatten_transpose': Conversion(lambda s, n, vocab: ((math.prod(s[1:]), s[0]),),
                                    lambda x, s, hf: (x.reshape(s[0], -1).T,),
                                    lambda xs, s: xs[0].T.reshape(s)),
    # [a, b, c] -> [c, a*b]: attention output [N, H, D] -> o_proj [D, N*H].
    'transpose_flatten': Conversion(lambda s, n, vocab: ((s[-1], math.prod(s[:-1])),),
                                    lambda x, s, hf: (x.reshape(-1, s[-1]).T,),
                                    lambda xs, s: xs[0].T.reshape(s)),
    'heads_in': Conversion(lambda s, n, vocab: ((s[0] * s[2], s[1]),),
                           lambda x, s, hf: (_heads_in_to_hf(x, hf[0]),),
                           lambda xs, s: _heads_in_from_hf(xs[0], s)),
    # Stacked pairs: kv_einsum [2, K, D, H] -> k_proj, v_proj; gating_einsum [2, F, D] -> gate, up.
    'stacked_heads_in': Conversion(lambda s, n, vocab: ((s[1] * s[3], s[2]),) * n,
                                   lambda x, s, hf: tuple(map(_heads_in_to_hf, x, hf)),
                                   lambda xs, s: [_heads_in_from_hf(x, s[1:]) for x in xs]),
    'stacked': Conversion(lambda s, n, vocab: (s[1:],) * n, lambda x, s, hf: tuple(x),
                          lambda xs, s: list(xs)),
    'stacked_transpose': Conversion(lambda s, n, vocab: (s[:0:-1],) * n,
                                    lambda x, s, hf: tuple(y.T for y in x),
                                    lambda xs, s: [x.T for x in xs]),
    'pad_vocab': Conversion(lambda s, n, vocab: ((vocab,) + s[1:],), _pad_vocab_to_hf,
                            lambda xs, s: xs[0][:s[0]]),
}
