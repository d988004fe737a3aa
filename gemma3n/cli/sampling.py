"""The sampling method that the command's options choose."""

from __future__ import annotations

from gemma3n.engine.sampling import Greedy, RandomSampling, SamplingMethod, TopkSampling, TopPSampling


def sampling_method(temperature: float | None, top_k: int | None,
                    top_p: float | None) -> SamplingMethod:
    """The sampling method of the command-line options (greedy when none is given)."""
    if top_k is not None and top_p is not None:
        raise ValueError('give --top-k or --top-p, not both')
    if temperature == 0:
        if top_k is not None or top_p is not None:
            raise ValueError('--temperature 0 means greedy decoding: drop --top-k/--top-p')
        return Greedy()
    if temperature is None:
        if top_k is None and top_p is None:
            return Greedy()
        temperature = 1.0
    if top_k is not None:
        return TopkSampling(k=top_k, temperature=temperature)
    if top_p is not None:
        return TopPSampling(p=top_p, temperature=temperature)
    return RandomSampling(temperature=temperature)
