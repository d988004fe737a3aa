"""One Gemma 3n decoder layer: AltUp predict, attention, LAuReL, FFN, AltUp correct, per-layer input."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma3n.altup import AltUp
from gemma3n.attention import Attention, KVContext, LayerCall, QueryInfo, take_rows
from gemma3n.config import TransformerConfig
from gemma3n.ffn import FeedForward
from gemma3n.laurel import Laurel
from gemma3n.layers import RMSNorm
from gemma3n.layers.axes import EMBED
from gemma3n.per_layer import PerLayerMapping

INV_SQRT2 = 2 ** -0.5   # LAuReL and attention outputs are averaged in RMS: (o + l) / √2


class Block(nn.Module):
    """Decoder layer `layer_index` of `config` (docs/architecture.md §2, step 4).

    Example:
        >>> block = Block(config=cfg, layer_index=0)
        >>> streams, context, _ = block.apply(params, streams, per_layer_input, query)
        >>> # streams: [A, B, L, D], per_layer_input: [B, L, P]
    """
    config: TransformerConfig
    layer_index: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        streams: jax.Array,
        per_layer_input: jax.Array,
        query: QueryInfo,
        call: LayerCall = LayerCall(),
    ) -> tuple[jax.Array, KVContext, dict[str, Any] | None]:
        """streams: [A, B, L, D], per_layer_input: [B, L, P] -> (new streams, K/V context, cache entry).

        `call` (see `LayerCall`) carries the cache, the shared K/V and the mask to attention.
        With `call.query_rows` the layer computes K/V (and its cache entry) for every token but
        everything else for one token per sequence, and returns streams [A, B, 1, D].
        """
        cfg, i = self.config, self.layer_index
        guard_on = cfg.guard_against_excess_precision

        def norm(name):
            return RMSNorm(guard_precision=guard_on, dtype=self.dtype, axis_name=EMBED, name=name)

        altup = AltUp(features=cfg.embed_dim, num_inputs=cfg.num_altup_inputs,
                      coef_clip=cfg.altup_coef_clip, guard_precision=guard_on, dtype=self.dtype, name='altup')
        predictions = altup.predict(streams)                                  # [A, B, L, D]
        active = predictions[0]
        h = norm('pre_attention_norm')(active)
        attn_out, context, new_entry = Attention(
            config=cfg, attn_type=cfg.attention_types[i],
            owns_kv=cfg.kv_source_layers()[i] == i, dtype=self.dtype,
            name='attn',
        )(h, query, call)
        if call.query_rows is not None:
            rows = call.query_rows
            predictions = take_rows(predictions, rows, batch_axis=1)
            active, h = predictions[0], take_rows(h, rows)
            per_layer_input = take_rows(per_layer_input, rows)
        if cfg.use_post_attn_norm:
            attn_out = norm('post_attention_norm')(attn_out)
        attn_out = attn_out + active
        if cfg.use_laurel:
            laurel = Laurel(features=cfg.embed_dim, rank=cfg.laurel_rank, dtype=self.dtype, name='laurel')(h)
            laurel = h + norm('post_laurel_norm')(laurel)
            attn_out = (attn_out + laurel) * jnp.asarray(INV_SQRT2, attn_out.dtype)

        ffw = FeedForward(features=cfg.embed_dim, hidden_dim=cfg.hidden_dim,
                          transpose_gating_einsum=cfg.transpose_gating_einsum,
                          sparsity=cfg.sparsity(i), dtype=self.dtype,
                          name='mlp')(norm('pre_ffw_norm')(attn_out))
        if cfg.use_post_ffw_norm:
            ffw = norm('post_ffw_norm')(ffw)
        activated = ffw + attn_out

        corrected = altup.correct(predictions, activated)                    # [A, B, L, D]
        mapped = PerLayerMapping(
            features=cfg.embed_dim, per_layer_dim=cfg.per_layer_input_dim,
            guard_precision=guard_on, dtype=self.dtype,
            name='per_layer_mapping',
        )(altup.scale_corrected_output(corrected[0]), per_layer_input)
        corrected = corrected.at[1:].add(mapped.astype(corrected.dtype))
        return corrected, context, new_entry
