"""What the Gaussian VAE and the VQ-VAE share: the decoders each method needs."""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from mtvae_jax import methods
from mtvae_jax.models import layers


class MultitaskAutoencoder(nn.Module):
  """Base of both model families: the decoders of `method` (a name in methods.METHODS).

  Subclasses define `setup` (with `padded`, `encoder` and the method's
  decoders, methods.PLAIN and/or methods.CONDITIONED) and
  `encode(x, key, train) -> (z, {term: (B,)})`.
  """
  image_shape: Sequence[int]
  method: str

  def grids(self, num_down):
    """Padded input side (multiple of 2**num_down) and the smallest grid, as (h, w) pairs."""
    padded = tuple(layers.padded_side(side, num_down) for side in self.image_shape[:2])
    return padded, tuple(side >> num_down for side in padded)

  def decode(self, z, m=None, *, train=False):
    """z -> (B, H, W, C). m=None: p(x|z), or p(x|z, m) with an empty mask where p(x|z) is absent."""
    height, width, channels = self.image_shape
    if m is None and methods.PLAIN not in methods.METHODS[self.method].decoders:
      m = jnp.zeros((z.shape[0], height, width, channels + 1), z.dtype)
    out = self.decoder(z, train=train) if m is None else self.cond_decoder(z, m, train=train)
    return out[:, :height, :width]

  def __call__(self, x, conds, key, *, train):
    """x: (B, H, W, C); conds: {name: m (B, H, W, 1 + C) or None}.

    Returns ({name: reconstruction (B, H, W, C)}, {loss term: (B,)}); every
    reconstruction decodes the same z.
    """
    z, terms = self.encode(x, key, train=train)
    return {name: self.decode(z, m, train=train) for name, m in conds.items()}, terms
