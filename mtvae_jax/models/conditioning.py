"""How a conditioned decoder takes in m (B, H, W, 1 + C), set by config.conditioning.

'dense': z and m are flattened, concatenated and mapped by one dense layer to
the decoder's first grid; its kernel grows with the image size times the
grid size.
'spatial': m stays an image. A stack of stride-2 convolutions brings it to
each grid of the decoder, from the padded image (level 0) to the first grid
(level L); on every grid, the decoder's input is concatenated channel-wise
with m's features there, so each output pixel sees the observed pixels near
it. Level j has hidden_sizes[j - 1] // SPATIAL_WIDTH_DIVISOR channels (the
encoder's width there, scaled down); level 0 is m itself.
"""
import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from mtvae_jax.families import CONDITIONINGS  # noqa: F401  (the names, for the models' fields)
from mtvae_jax.models import layers

SPATIAL_WIDTH_DIVISOR = 4


def merge_condition(z, m, shape, dtype):
  """Flatten z and m, concatenate, and map with one dense layer (computing in `dtype`) to `shape`.

  z: (B, ...), m: (B, H, W, 1 + C) or None -> (B, *shape). Call inside a
  compact method: the dense layer belongs to the calling module.
  """
  batch = z.shape[0]
  inputs = [z.reshape(batch, -1)] + ([] if m is None else [m.reshape(batch, -1)])
  return layers.Dense(math.prod(shape), dtype=dtype)(*inputs).reshape(batch, *shape)


def spatial_widths(hidden_sizes):
  """Channels of m's features on levels 1..L."""
  return tuple(max(1, size // SPATIAL_WIDTH_DIVISOR) for size in hidden_sizes)


class SpatialCondition(nn.Module):
  """m (B, H, W, 1 + C) -> {(h, w): features (B, h, w, c)}, one entry per level 0..L.

  m is zero-padded at the bottom/right to the decoder's output grid, first
  grid << L (L = len(widths)); level j is a 3x3 stride-2 convolution and
  LeakyReLU of level j - 1, with widths[j - 1] channels.
  """
  widths: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, m, first_grid):
    h = layers.pad_to(m, *(side << len(self.widths) for side in first_grid))
    levels = {h.shape[1:3]: h}
    for width in self.widths:
      h = layers.leaky_relu(layers.down(width, 3, self.dtype)(h))
      levels[h.shape[1:3]] = h
    return levels


def spatial_levels(m, conditioning, hidden_sizes, first_grid, dtype):
  """m's features on every grid for `attach` ('spatial' and m given), else None."""
  if conditioning != 'spatial' or m is None:
    return None
  return SpatialCondition(spatial_widths(hidden_sizes), dtype)(m, tuple(first_grid))


def first_grid(z, m, conditioning, hidden_sizes, shape, dtype):
  """The decoder's input on its first grid, and m's features for its later grids.

  z: (B, ...), m: (B, H, W, 1 + C) or None, shape: (h, w, c) of the first
  grid. One dense layer maps z (and m, for 'dense') to the grid, except where
  z already has its shape and no m joins it there (a VQ decoder's z_q); for
  'spatial', m's features are attached. Returns (B, h, w, c [+ m's]) and the
  levels for `attach` (None without spatial m). The layers compute in `dtype`.
  Call inside a compact method: the layers belong to the calling module.
  """
  dense_m = m if conditioning == 'dense' else None
  h = (z if dense_m is None and z.shape[1:] == tuple(shape)
       else merge_condition(z, dense_m, shape, dtype))
  levels = spatial_levels(m, conditioning, hidden_sizes, shape[:2], dtype)
  return attach(h, levels), levels


def attach(h, levels):
  """h (B, h, w, c) with m's features on its grid appended as channels; h itself for no levels."""
  if levels is None:
    return h
  return jnp.concatenate([h, levels[h.shape[1:3]]], axis=-1)


def upsample(h, levels, widths, kernel, train, dtype):
  """One stride-2 `up` (computing in `dtype`) with batch norm and LeakyReLU per width in
  `widths`, m's features (levels) attached after each: the decoders' path to the image. Call
  inside a compact method."""
  for features in widths:
    h = layers.leaky_relu(layers.batch_norm(train)(layers.up(features, kernel, dtype)(h)))
    h = attach(h, levels)
  return h
