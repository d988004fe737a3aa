"""Configuration of the Gemma 3n decoder: one frozen dataclass drives every module.

`TransformerConfig` holds every size and switch of the text decoder (docs/architecture.md §1). The
presets `Gemma3n_E4B` / `Gemma3n_E2B` (in `gemma3n.models`) build it with the published values.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

# Default sizes of the E4B text decoder (docs/architecture.md §1).
E4B_NUM_LAYERS = 35
E2B_NUM_LAYERS = 30
SPARSE_LAYERS = 10          # the first ten layers use gaussian top-k activation sparsity
SPARSITY_TARGET = 0.95      # fraction of gate activations zeroed on those layers
E4B_SHARED_LAYERS = 15      # last 15 of 35 layers reuse K/V of earlier layers
E2B_SHARED_LAYERS = 10


class AttentionType(enum.Enum):
    """Kind of attention of one layer: full causal, or a sliding window."""
    GLOBAL = 1
    LOCAL_SLIDING = 2


class QueryPreAttentionNormalisation(enum.Enum):
    """How queries are scaled before the dot product with keys."""
    BY_ONE_OVER_SQRT_HEAD_DIM = enum.auto()
    BY_EMBED_DIM_DIV_NUM_HEADS = enum.auto()
    BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS = enum.auto()
    NONE = enum.auto()  # scale 1.0: q/k RMSNorm already bounds the logits


# Gemma 3n's repeating layer pattern: four sliding-window layers, then one global layer.
GEMMA3N_ATTENTION_PATTERN = (
        AttentionType.LOCAL_SLIDING,
        AttentionType.LOCAL_SLIDING,
        AttentionType.LOCAL_SLIDING,
        AttentionType.LOCAL_SLIDING,
        AttentionType.GLOBAL,
)


def make_attention_types(
        num_layers: int, pattern: tuple[AttentionType, ...] = GEMMA3N_ATTENTION_PATTERN
) -> tuple[AttentionType, ...]:
    """Repeats `pattern` to `num_layers` entries (truncating the last repeat)."""
    return tuple(pattern[i % len(pattern)] for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class KVCacheSharingConfig:
    """Which layers reuse the keys and values of earlier layers.

    The last `num_layers - int(num_layers - frac_shared_layers * num_layers)` layers compute no
    K/V of their own: a shared global layer reads layer `n_unshared - 1`, a shared local layer
    reads layer `n_unshared - 2` (docs/architecture.md §3).

    Example:
        >>> KVCacheSharingConfig(frac_shared_layers=15 / 35).num_unshared_layers(35)
        20
    """
    frac_shared_layers: float = 0.0
    share_global: bool = False
    share_local: bool = False

    def num_unshared_layers(self, num_layers: int) -> int:
        return int(num_layers - self.frac_shared_layers * num_layers)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Every size and switch of the Gemma 3n text decoder (docs/architecture.md §1).

    Example:
        >>> from gemma3n import Gemma3n_E4B
        >>> cfg = Gemma3n_E4B().config
        >>> cfg.num_layers, cfg.kv_source_layers()[20]
        (35, 18)
    """
    num_embed: int
    embed_dim: int
    hidden_dim: int
    num_heads: int
    head_dim: int
    num_kv_heads: int
    final_logit_softcap: float | None
    use_post_attn_norm: bool
    use_post_ffw_norm: bool
    attention_types: tuple[AttentionType, ...]
    query_pre_attn_norm: QueryPreAttentionNormalisation = (
            QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM
    )
    attn_logits_soft_cap: float | None = None
    sliding_window_size: int | None = None
    transpose_gating_einsum: bool = False
    local_base_frequency: int = 10_000
    global_base_frequency: int = 10_000
    local_scale_factor: float = 1.0
    global_scale_factor: float = 1.0
    vision_encoder: Any = None
    # The released checkpoints' towers (MobileNet-V5, audio): a `gemma3n.towers_config.TowersConfig`.
    towers: Any = None
    use_qk_norm: bool = False
    qk_norm_with_scale: bool = True
    use_value_norm: bool = False
    activation_sparsity_pattern: tuple[float, ...] | None = None
    per_layer_input_dim: int = 0
    use_laurel: bool = False
    laurel_rank: int = 0
    use_altup: bool = False
    num_altup_inputs: int = 1
    altup_coef_clip: float | None = None
    kv_cache_sharing_config: KVCacheSharingConfig | None = None
    scale_plus_one: bool = True
    guard_against_excess_precision: bool = False

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                    f'num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}.')
        if min(self.local_scale_factor, self.global_scale_factor) < 1.0:
            raise ValueError('RoPE scale factors must be >= 1.')
        if (self.activation_sparsity_pattern is not None
                and len(self.activation_sparsity_pattern) != self.num_layers):
            raise ValueError(
                    f'activation_sparsity_pattern has {len(self.activation_sparsity_pattern)} entries, '
                    f'expected one per layer ({self.num_layers}).')
        if AttentionType.LOCAL_SLIDING in self.attention_types and not self.sliding_window_size:
            raise ValueError('LOCAL_SLIDING layers need a sliding_window_size.')
        if self.use_altup and self.num_altup_inputs < 2:
            raise ValueError('AltUp needs num_altup_inputs >= 2.')
        if self.use_altup and not self.per_layer_input_dim:
            raise ValueError('Gemma 3n blocks with AltUp need per_layer_input_dim > 0.')
        if self.vision_encoder is not None and self.towers is not None and self.towers.vision:
            raise ValueError('A model has one vision tower: the SigLIP vision_encoder or the '
                             'released towers\' MobileNet-V5 (towers.vision), not both.')
        if self.kv_cache_sharing_config is not None and self.num_shared_layers:
            if self.num_unshared_layers < 2:
                raise ValueError('KV sharing needs at least two layers that compute their own K/V.')

    @property
    def num_layers(self) -> int:
        return len(self.attention_types)

    @property
    def num_unshared_layers(self) -> int:
        """Number of leading layers that compute their own K/V."""
        if self.kv_cache_sharing_config is None:
            return self.num_layers
        return self.kv_cache_sharing_config.num_unshared_layers(self.num_layers)

    @property
    def num_shared_layers(self) -> int:
        return self.num_layers - self.num_unshared_layers

    def kv_source_layers(self) -> tuple[int, ...]:
        """For each layer, the index of the layer whose K/V it attends with (itself if unshared)."""
        n = self.num_unshared_layers
        sharing = self.kv_cache_sharing_config
        sources = []
        for i, kind in enumerate(self.attention_types):
            if i < n:
                sources.append(i)
            elif kind == AttentionType.GLOBAL and sharing.share_global:
                sources.append(n - 1)
            elif kind == AttentionType.LOCAL_SLIDING and sharing.share_local:
                sources.append(n - 2)
            else:
                sources.append(i)
        return tuple(sources)

    def sparsity(self, layer: int) -> float:
        if self.activation_sparsity_pattern is None:
            return 0.0
        return float(self.activation_sparsity_pattern[layer])

    def base_frequency(self, kind: AttentionType) -> int:
        return self.global_base_frequency if kind == AttentionType.GLOBAL else self.local_base_frequency

    def scale_factor(self, kind: AttentionType) -> float:
        return self.global_scale_factor if kind == AttentionType.GLOBAL else self.local_scale_factor

    def query_pre_attn_scalar(self) -> float:
        """The factor queries are multiplied by before q·k (the reference's value for each member)."""
        match self.query_pre_attn_norm:
            case QueryPreAttentionNormalisation.NONE:
                return 1.0
            case QueryPreAttentionNormalisation.BY_EMBED_DIM_DIV_NUM_HEADS:
                # The reference multiplies by the integer quotient itself, not its inverse root.
                return self.embed_dim // self.num_heads
            case QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS:
                return (self.embed_dim // self.num_heads) ** -0.5
            case _:
                return self.head_dim ** -0.5

    @classmethod
    def gemma3n(
            cls,
            *,
            num_layers: int = E4B_NUM_LAYERS,
            hidden_dim: int = 16384,
            num_shared_layers: int = E4B_SHARED_LAYERS,
            num_sparse_layers: int = SPARSE_LAYERS,
            **overrides: Any,
    ) -> 'TransformerConfig':
        """The Gemma 3n architecture at any size; E4B values unless overridden.

        Small test models change widths and depth but keep every mechanism:
            >>> cfg = TransformerConfig.gemma3n(num_layers=10, num_shared_layers=5, embed_dim=64,
            ...     hidden_dim=128, num_heads=4, num_kv_heads=2, head_dim=16, num_embed=300,
            ...     per_layer_input_dim=8, laurel_rank=4, sliding_window_size=8)
        """
        values = dict(
                num_embed=262_144,
                embed_dim=2048,
                hidden_dim=hidden_dim,
                num_heads=8,
                head_dim=256,
                num_kv_heads=2,
                final_logit_softcap=None,
                use_post_attn_norm=True,
                use_post_ffw_norm=True,
                attention_types=make_attention_types(num_layers),
                query_pre_attn_norm=QueryPreAttentionNormalisation.NONE,
                attn_logits_soft_cap=None,
                sliding_window_size=512,
                transpose_gating_einsum=True,
                local_base_frequency=10_000,
                global_base_frequency=1_000_000,
                local_scale_factor=1.0,
                global_scale_factor=1.0,
                vision_encoder=None,
                use_qk_norm=True,
                qk_norm_with_scale=True,
                use_value_norm=True,
                activation_sparsity_pattern=(
                        (SPARSITY_TARGET,) * num_sparse_layers + (0.0,) * (num_layers - num_sparse_layers)),
                per_layer_input_dim=256,
                use_laurel=True,
                laurel_rank=64,
                use_altup=True,
                num_altup_inputs=4,
                altup_coef_clip=120.0,
                kv_cache_sharing_config=KVCacheSharingConfig(
                        frac_shared_layers=num_shared_layers / num_layers,
                        share_global=True,
                        share_local=True,
                ),
                scale_plus_one=False,
                guard_against_excess_precision=True,
        )
        values.update(overrides)
        return cls(**values)
