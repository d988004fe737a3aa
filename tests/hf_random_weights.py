"""Random weights for a `transformers` module whose numbers stay O(1) through it: norm scales
1 + 0.1 N(0, 1), per_dim_scale 0.3 N(0, 1), other weights N(0, 1 / fan_in), so no weight is a
no-op. Used by the audio tower's tests and by `bench/audio_tower.py` (the one place bench reads
from tests/: both must draw the same kind of weights)."""

import numpy as np
import torch

SCALE_NOISE = 0.1
PER_DIM_NOISE = 0.3


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Overwrites every weight of `module` in place, drawn with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in module.state_dict().items():
            noise = torch.randn(weight.shape, generator=generator)
            if name.endswith('per_dim_scale'):
                weight.copy_(PER_DIM_NOISE * noise)
            elif weight.ndim == 1:
                weight.copy_(1 + SCALE_NOISE * noise)
            else:
                weight.copy_(noise / np.sqrt(np.prod(weight.shape[1:])))
