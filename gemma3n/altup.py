"""AltUp: the model carries several streams of width D and updates only one per block.

Each block predicts every stream from a router-weighted mix of all streams, runs attention and
FFN on stream 0, then corrects every stream with the innovation (block output − prediction 0).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma3n.layers import Einsum, RMSNorm, declare, guard
from gemma3n.layers.axes import ALTUP, ALTUP_SOURCE, EMBED, MODALITIES

# The reference fixes the router's number of modalities at 4, independent of the stream count.
NUM_MODALITIES = 4
RMS_FLOOR = 1e-12   # floor of a stream's RMS when rescaling it to stream 0's magnitude
FEW_TOKENS = 16     # tokens up to which `predict` mixes the streams without a matrix product


def match_rms(x: jax.Array, target: jax.Array) -> jax.Array:
    """Rescales each vector of x [..., D] to the RMS of the matching vector of target."""
    def rms(v):
        return jnp.sqrt(jnp.mean(jnp.square(v.astype(jnp.float32)), axis=-1, keepdims=True))
    scaled = x.astype(jnp.float32) * rms(target) / jnp.maximum(rms(x), RMS_FLOOR)
    return scaled.astype(x.dtype)


class AltUp(nn.Module):
    """Predict / correct of the AltUp streams for one block.

    Streams are stacked as [A, B, L, D]; stream 0 is the one the block computes on.

    Example:
        >>> altup = AltUp(features=8, num_inputs=4, coef_clip=120.0)
        >>> streams = jnp.ones((4, 1, 3, 8))
        >>> params = altup.init(jax.random.key(0), streams, method=AltUp.predict)
    """
    features: int
    num_inputs: int
    coef_clip: float | None = None
    guard_precision: bool = False
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.router_norm_layer = RMSNorm(guard_precision=self.guard_precision, dtype=self.dtype,
                                         axis_name=EMBED)
        self.modality_router = Einsum((self.features, NUM_MODALITIES), (EMBED, MODALITIES), 0, 1,
                                      dtype=self.dtype)
        a, m = self.num_inputs, NUM_MODALITIES
        # The coefficients mix streams with plain einsums (after clipping): not projections, but
        # their fan-in is the router's output.
        self.prediction_coefs = declare(self, 'prediction_coefs', (m, a, a),
                                        (MODALITIES, ALTUP, ALTUP_SOURCE), nn.initializers.zeros,
                                        self.dtype, in_axes=(0,))
        self.correction_coefs = declare(self, 'correction_coefs', (m, a), (MODALITIES, ALTUP),
                                        nn.initializers.zeros, self.dtype, in_axes=(0,))
        self.correct_output_scale = declare(self, 'correct_output_scale', (self.features,),
                                            (EMBED,), nn.initializers.ones, self.dtype)

    def _clip(self, coefs: jax.Array) -> jax.Array:
        coefs = coefs.astype(jnp.float32)
        if self.coef_clip is None:
            return coefs
        return jnp.clip(coefs, -self.coef_clip, self.coef_clip)

    def route(self, x: jax.Array) -> jax.Array:
        """x: [B, L, D] -> router weights [B, L, M] in float32, each in (-1, 1)."""
        normed = self.router_norm_layer(x) * jnp.asarray(1.0 / self.features, x.dtype)
        return jnp.tanh(self.modality_router('BTD,DM->BTM', normed).astype(jnp.float32))

    def predict(self, streams: jax.Array) -> jax.Array:
        """streams: [A, B, L, D] -> predictions [A, B, L, D]: s_i + Σ_j c_ij(s_0) · s_j."""
        coefs = jnp.einsum('BTM,MIJ->BTIJ', self.route(streams[0]),
                           self._clip(self.prediction_coefs))
        streams32 = streams.astype(jnp.float32)
        if streams.shape[1] * streams.shape[2] <= FEW_TOKENS:
            # A sum of A broadcast products, one XLA loop: as a product, XLA's CPU backend hands
            # each layer's tiny [A, A] x [A, D] to YNNPACK at ~50 us a call (decode).
            by_target = jnp.moveaxis(coefs, 2, 0)[..., None]                # [I, B, L, J, 1]
            mixed = sum(by_target[..., j, :] * streams32[j] for j in range(self.num_inputs))
        else:
            # Over many tokens the product is faster than XLA's loops (a LoRA step at 512).
            mixed = jnp.einsum('BTIJ,JBTD->IBTD', coefs, streams32)
        return (streams32 + mixed).astype(streams.dtype)

    def correct(self, predictions: jax.Array, activated: jax.Array) -> jax.Array:
        """Moves every prediction by the innovation of the block output `activated` [B, L, D].

        predictions: [A, B, L, D] -> corrected streams [A, B, L, D].
        """
        coefs = jnp.einsum('BTM,MA->BTA', self.route(activated),
                           self._clip(self.correction_coefs)) + 1.0
        coefs = guard(coefs, self.guard_precision)
        innovation = (activated - predictions[0]).astype(jnp.float32)        # [B, L, D]
        corrected = (predictions.astype(jnp.float32)
                     + jnp.moveaxis(coefs, -1, 0)[..., None] * innovation)
        return corrected.astype(predictions.dtype)

    def scale_corrected_output(self, x: jax.Array) -> jax.Array:
        """x: [B, L, D] (corrected stream 0) -> x · correct_output_scale."""
        return x * self.correct_output_scale.astype(x.dtype)
