"""SigLIP vision encoder of Gemma 3n: ViT, average-pooling exit, image-to-soft-token wrapper.

docs/architecture.md §5. `SigLiPFromPatches` turns images `[B, N, H, W, C]` into soft tokens
`[B, N, num_mm_tokens_per_image, width]`: preprocess (resize + scale to [-1, 1]) -> patchify ->
`ViTModel` (patch embedding, learned position embedding, pre-LayerNorm encoder blocks, final
LayerNorm) -> `VisionExit` (average pooling of the patch grid). The projection into the text
embedding space is the embedder's job (`mm_soft_embedding_norm`, `mm_input_projection`).

Submodule and parameter names follow the reference checkpoint layout exactly (see
`tests/data/gemma3n_e4b_params.json`, keys under `vision_encoder/`), which is why they are
spelled out.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma3n.vision import preprocess as preprocessing

LAYER_NORM_EPS = 1e-6
POSEMB_LEARN = "learn"
# Images are given per sequence as [B, N, H, W, C]: batch, images per sequence, pixels, channels.
IMAGES_RANK = 5


def _layer_norm(name: str) -> nn.LayerNorm:
    # Two-pass variance: the one-pass E[x^2] - E[x]^2 form loses precision on wide activations.
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, name=name)


def _dense(features: int, dtype_mm: str, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=jnp.dtype(dtype_mm),
                    kernel_init=nn.initializers.xavier_uniform(), name=name)


def _checkpoint_policy(name: str):
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None:
        raise ValueError(
            f"remat_policy must name a function of jax.checkpoint_policies (e.g. "
            f"'nothing_saveable'); got {name!r}")
    return policy


class PatchEmbedding(nn.Module):
    """Linear embedding of flattened patches; the kernel keeps the conv layout `[ph, pw, C, width]`.

    Equivalent to a `ph x pw` convolution with stride `(ph, pw)` over the image.

    Example:
        >>> emb = PatchEmbedding(patch_size=(14, 14), width=1152)
        >>> params = emb.init(jax.random.key(0), jnp.zeros((1, 4096, 14 * 14 * 3)))
    """
    patch_size: tuple[int, int]
    width: int
    dtype_mm: str = "float32"

    @nn.compact
    def __call__(self, patches: jax.Array) -> jax.Array:
        """`[B, L, ph*pw*C]` -> `[B, L, width]`."""
        patch_h, patch_w = self.patch_size
        channels = patches.shape[-1] // (patch_h * patch_w)
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
            (patch_h, patch_w, channels, self.width), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.width,), jnp.float32)
        dtype = jnp.dtype(self.dtype_mm)
        flat_kernel = kernel.reshape(-1, self.width).astype(dtype)
        return jnp.einsum("blp,pd->bld", patches.astype(dtype), flat_kernel) + bias


class MlpBlock(nn.Module):
    """Dense -> tanh-GELU -> Dense, back to the input width.

    Example:
        >>> mlp = MlpBlock(mlp_dim=4304)
        >>> params = mlp.init(jax.random.key(0), jnp.zeros((1, 4096, 1152)), True)
    """
    mlp_dim: int
    dropout: float = 0.0
    dtype_mm: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        """`[B, L, D]` -> `[B, L, D]`."""
        width = x.shape[-1]
        h = _dense(self.mlp_dim, self.dtype_mm, "Dense_0")(x)
        h = nn.Dropout(rate=self.dropout)(nn.gelu(h, approximate=True), deterministic)
        return _dense(width, self.dtype_mm, "Dense_1")(h)


class Encoder1DBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

    Returns `(x, None)` so that the same block is a valid `nn.scan` body.

    Example:
        >>> block = Encoder1DBlock(mlp_dim=4304, num_heads=16)
        >>> params = block.init(jax.random.key(0), jnp.zeros((1, 4096, 1152)), True)
    """
    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    dtype_mm: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> tuple[jax.Array, None]:
        """`[B, L, D]` -> (`[B, L, D]`, None)."""
        # Flax's attention scales queries by 1/sqrt(head_dim) and keeps biases on q/k/v/out.
        attention = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, dtype=jnp.dtype(self.dtype_mm),
            kernel_init=nn.initializers.xavier_uniform(), deterministic=True,
            name="MultiHeadDotProductAttention_0")
        y = attention(_layer_norm("LayerNorm_0")(x))
        x = x + nn.Dropout(rate=self.dropout)(y, deterministic)
        y = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout, dtype_mm=self.dtype_mm,
                     name="MlpBlock_0")(_layer_norm("LayerNorm_1")(x), deterministic)
        x = x + nn.Dropout(rate=self.dropout)(y, deterministic)
        return x, None


class Encoder(nn.Module):
    """`depth` encoder blocks then the final LayerNorm `encoder_norm`.

    With `scan=True` the blocks' parameters are stacked under `encoderblock` (leading axis
    `depth`) instead of `encoderblock_{i}`; every block is rematerialised with `remat_policy`
    when differentiated.

    Example:
        >>> enc = Encoder(depth=27, mlp_dim=4304, num_heads=16)
        >>> params = enc.init(jax.random.key(0), jnp.zeros((1, 4096, 1152)), True)
    """
    depth: int
    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    scan: bool = False
    remat_policy: str = "nothing_saveable"
    dtype_mm: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        """`[B, L, D]` -> `[B, L, D]`."""
        # static_argnums counts `self` as argument 0: `deterministic` is a Python bool.
        block_cls = nn.remat(Encoder1DBlock, prevent_cse=not self.scan, static_argnums=(2,),
                             policy=_checkpoint_policy(self.remat_policy))
        block_fields = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                            dropout=self.dropout, dtype_mm=self.dtype_mm)
        if self.scan:
            scanned = nn.scan(block_cls, variable_axes={"params": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=nn.broadcast, length=self.depth)
            x, _ = scanned(**block_fields, name="encoderblock")(x, deterministic)
        else:
            for index in range(self.depth):
                x, _ = block_cls(**block_fields, name=f"encoderblock_{index}")(x, deterministic)
        return _layer_norm("encoder_norm")(x)


class ViTModel(nn.Module):
    """SigLIP vision transformer on flattened patches (E4B: So400m, 14x14 patches, width 1152).

    Input patches `[B, L, ph*pw*C]` (row-major patch grid, each patch flattened as
    `[ph, pw, C]`), output `[B, L, width]`. The learned position embedding has shape
    `[1, L, width]`, fixed by the patch count seen at initialisation.

    Example:
        >>> vit = ViTModel()
        >>> patches = jnp.zeros((1, 4096, 14 * 14 * 3))
        >>> params = vit.init(jax.random.key(0), patches)['params']
        >>> features = vit.apply({'params': params}, patches)     # [1, 4096, 1152]
    """
    patch_size: tuple[int, int] = (14, 14)
    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    posemb: str = POSEMB_LEARN
    dropout: float = 0.0
    scan: bool = False
    remat_policy: str = "nothing_saveable"
    dtype_mm: str = "float32"

    @nn.compact
    def __call__(self, patches: jax.Array, *, is_training: bool = False) -> jax.Array:
        """`[B, L, ph*pw*C]` -> `[B, L, width]`."""
        if self.posemb != POSEMB_LEARN:
            raise ValueError(f"posemb must be {POSEMB_LEARN!r}; got {self.posemb!r}")
        if self.width % self.num_heads:
            raise ValueError(
                f"width ({self.width}) must be divisible by num_heads ({self.num_heads})")
        pixels_per_patch = self.patch_size[0] * self.patch_size[1]
        if patches.ndim != 3 or patches.shape[-1] % pixels_per_patch:
            raise ValueError(
                f"patches must have shape [batch, num_patches, {pixels_per_patch} * channels] "
                f"for patch_size {self.patch_size}; got shape {patches.shape}")
        deterministic = not is_training
        x = PatchEmbedding(patch_size=self.patch_size, width=self.width, dtype_mm=self.dtype_mm,
                           name="embedding")(patches)
        pos_embedding = self.param(
            "pos_embedding", nn.initializers.normal(stddev=1 / math.sqrt(self.width)),
            (1, patches.shape[1], self.width), jnp.float32)
        x = nn.Dropout(rate=self.dropout)(x + pos_embedding, deterministic)
        encoder = Encoder(depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                          dropout=self.dropout, scan=self.scan, remat_policy=self.remat_policy,
                          dtype_mm=self.dtype_mm, name="Transformer")
        return encoder(x, deterministic)


def _square_side(length: int, what: str) -> int:
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"{what} ({length}) must be a perfect square (a square token grid)")
    return side


class VisionExit(nn.Module):
    """Average-pools a square token grid to `output_length` tokens (E4B: 64x64 -> 16x16 = 256).

    The pooling window is `sqrt(L) / sqrt(output_length)` on each side; no parameters.

    Example:
        >>> pooled = VisionExit(output_length=256).apply({}, jnp.zeros((2, 4096, 1152)))
        >>> pooled.shape
        (2, 256, 1152)
    """
    output_length: int = 256

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[..., L, D]` -> `[..., output_length, D]`."""
        in_side = _square_side(x.shape[-2], "number of input tokens")
        out_side = _square_side(self.output_length, "output_length")
        if in_side % out_side:
            raise ValueError(
                f"token grid side {in_side} is not a multiple of the output grid side {out_side}")
        window = in_side // out_side
        *batch, _, width = x.shape
        grid = x.reshape(*batch, out_side, window, out_side, window, width)
        pooled = grid.mean(axis=(-4, -2))
        return pooled.reshape(*batch, self.output_length, width)


class SigLiPFromPatches(nn.Module):
    """Images `[B, N, H, W, C]` -> soft tokens `[B, N, num_mm_tokens_per_image, width]` float32.

    Steps (each callable on its own through `apply(..., method=...)`): `preprocess` (any H, W:
    antialiased bilinear resize to `image_height x image_width`, scale to [-1, 1]), `patchify`,
    `encode_patches` (the ViT `siglip_encoder`), then the average-pooling exit `siglip_exit`,
    whose `output_length` must equal `num_mm_tokens_per_image`. With `apply_stop_gradient` no
    gradient flows back into the encoder.

    Example:
        >>> model = SigLiPFromPatches()
        >>> images = jnp.zeros((1, 2, 480, 640, 3), jnp.uint8)          # [B, N, H, W, C]
        >>> params = model.init(jax.random.key(0), images)['params']
        >>> soft_tokens = model.apply({'params': params}, images)       # [1, 2, 256, 1152]

    A small model: `SigLiPFromPatches(siglip_encoder=ViTModel(width=32, depth=2, mlp_dim=64,
    num_heads=4), siglip_exit=VisionExit(output_length=4), num_mm_tokens_per_image_prepool=64,
    num_mm_tokens_per_image=4, image_height=112, image_width=112)`.
    """
    # The reference's field order (positional arguments mean the same in both).
    siglip_encoder: ViTModel = dataclasses.field(default_factory=ViTModel)
    siglip_exit: VisionExit = dataclasses.field(default_factory=VisionExit)
    num_mm_tokens_per_image_prepool: int = 4096
    num_mm_tokens_per_image: int = 256
    image_height: int = preprocessing.IMAGE_HEIGHT
    image_width: int = preprocessing.IMAGE_WIDTH
    image_channels: int = preprocessing.IMAGE_CHANNELS
    apply_stop_gradient: bool = True

    def __post_init__(self) -> None:
        # A submodule built inside another module's method binds itself to that module; detach
        # it so that it always becomes our child under its field name (the checkpoint path).
        for name in ("siglip_encoder", "siglip_exit"):
            object.__setattr__(self, name, getattr(self, name).clone(parent=None, name=None))
        super().__post_init__()
        if self.siglip_exit.output_length != self.num_mm_tokens_per_image:
            raise ValueError(
                f"siglip_exit.output_length ({self.siglip_exit.output_length}) must equal "
                f"num_mm_tokens_per_image ({self.num_mm_tokens_per_image}): the exit pools each "
                f"image to the number of soft tokens its block in the text holds")
        patch_h, patch_w = self.siglip_encoder.patch_size
        if self.image_height % patch_h or self.image_width % patch_w:
            raise ValueError(
                f"image size {self.image_height}x{self.image_width} is not a multiple of the "
                f"patch size {patch_h}x{patch_w}")
        num_patches = (self.image_height // patch_h) * (self.image_width // patch_w)
        if num_patches != self.num_mm_tokens_per_image_prepool:
            raise ValueError(
                f"num_mm_tokens_per_image_prepool ({self.num_mm_tokens_per_image_prepool}) must "
                f"equal the patch count of a {self.image_height}x{self.image_width} image with "
                f"{patch_h}x{patch_w} patches ({num_patches})")

    def preprocess(self, images: jax.Array) -> jax.Array:
        """uint8/float `[B, N, H, W, C]` in [0, 255] -> float32 `[B, N, height, width, C]`.

        `height, width` are `image_height, image_width`; values end in [-1, 1].
        """
        if images.ndim != IMAGES_RANK:
            raise ValueError(
                f"images must have shape [batch, num_images, height, width, "
                f"{self.image_channels}]; got shape {tuple(images.shape)}")
        return preprocessing.preprocess_images(
            images, self.image_height, self.image_width, self.image_channels)

    def patchify(self, images: jax.Array) -> jax.Array:
        """`[B, N, image_height, image_width, C]` -> `[B, N, num_patches, ph*pw*C]` (row-major)."""
        expected = (self.image_height, self.image_width, self.image_channels)
        if images.ndim != IMAGES_RANK or tuple(images.shape[2:]) != expected:
            raise ValueError(
                f"patchify expects preprocessed images [batch, num_images, {expected[0]}, "
                f"{expected[1]}, {expected[2]}]; got shape {tuple(images.shape)}")
        patch_h, patch_w = self.siglip_encoder.patch_size
        batch, num_images, height, width, channels = images.shape
        rows, cols = height // patch_h, width // patch_w
        grid = images.reshape(batch, num_images, rows, patch_h, cols, patch_w, channels)
        grid = grid.transpose(0, 1, 2, 4, 3, 5, 6)
        return grid.reshape(batch, num_images, rows * cols, patch_h * patch_w * channels)

    def encode_patches(self, patches: jax.Array, *, is_training: bool = False) -> jax.Array:
        """`[B, N, num_patches, ph*pw*C]` -> ViT features `[B, N, num_patches, width]`, unpooled."""
        if patches.ndim != 4:
            raise ValueError(
                f"patches must have shape [batch, num_images, num_patches, patch_pixels]; "
                f"got shape {tuple(patches.shape)}")
        batch, num_images = patches.shape[:2]
        features = self.siglip_encoder(patches.reshape(batch * num_images, *patches.shape[2:]),
                                       is_training=is_training)
        return features.reshape(batch, num_images, *features.shape[1:])

    def __call__(self, images: jax.Array, *, is_training: bool = False) -> jax.Array:
        """Images `[B, N, H, W, C]` -> soft tokens `[B, N, num_mm_tokens_per_image, width]`."""
        features = self.encode_patches(self.patchify(self.preprocess(images)),
                                       is_training=is_training)
        soft_tokens = self.siglip_exit(features)
        if self.apply_stop_gradient:
            soft_tokens = jax.lax.stop_gradient(soft_tokens)
        return soft_tokens
