"""Gaussian VAE (thesis 2.1.2) with optional conditioned decoder (3.2, 3.3)."""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtvae_jax import losses
from mtvae_jax import methods
from mtvae_jax.models import base
from mtvae_jax.models import conditioning
from mtvae_jax.models import layers


class Encoder(nn.Module):
  """(B, H, W, C) -> mean, log-variance, each (B, latent_dim)."""
  hidden_sizes: Sequence[int]
  latent_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    for features in self.hidden_sizes:
      x = layers.leaky_relu(layers.batch_norm(train)(layers.down(features, 3, self.dtype)(x)))
    x = x.reshape(x.shape[0], -1)
    dense = lambda: layers.Dense(self.latent_dim, dtype=self.dtype)
    return dense()(x), dense()(x)


class Decoder(nn.Module):
  """z: (B, latent_dim) [+ m] -> (B, Hp, Wp, C) in [0, 1]; mirrors the encoder.

  m enters as `conditioning` says (models/conditioning.py): into the dense
  layer that makes the smallest grid, or on every grid.
  """
  hidden_sizes: Sequence[int]
  start: Sequence[int]          # (h, w) of the smallest grid
  out_channels: int
  conditioning: str = 'dense'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, m=None, *, train):
    h, levels = conditioning.first_grid(z, m, self.conditioning, self.hidden_sizes,
                                        (*self.start, self.hidden_sizes[-1]), self.dtype)
    widths = (*reversed(self.hidden_sizes[:-1]), self.hidden_sizes[0])
    h = conditioning.upsample(h, levels, widths, 3, train, self.dtype)
    return nn.sigmoid(layers.Conv(self.out_channels, 3, dtype=self.dtype)(h))


class GaussianVAE(base.MultitaskAutoencoder):
  """Encoder, reparameterised z, and the decoders of the method."""
  hidden_sizes: Sequence[int]
  latent_dim: int
  conditioning: str = 'dense'   # how cond_decoder takes in m: conditioning.CONDITIONINGS
  dtype: Any = jnp.float32      # of the convolutions and matrix products: config.PRECISIONS

  def setup(self):
    channels = self.image_shape[-1]
    self.padded, start = self.grids(len(self.hidden_sizes))
    self.encoder = Encoder(self.hidden_sizes, self.latent_dim, self.dtype)
    for name in methods.METHODS[self.method].decoders:  # m reaches only methods.CONDITIONED
      setattr(self, name, Decoder(self.hidden_sizes, start, channels, self.conditioning,
                                  self.dtype))

  def encode(self, x, key, *, train):
    """Returns z (B, latent_dim), drawn by reparameterisation, and the KL term."""
    mean, log_var = self.encoder(layers.pad_to(x, *self.padded), train=train)
    z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(key, mean.shape)
    return z, {'kl': losses.kl_divergence(mean, log_var)}

  def posterior(self, x):
    """(B, H, W, C) images -> mean and log-variance (B, latent_dim) of q(z|x), batch norm in
    inference mode."""
    return self.encoder(layers.pad_to(x, *self.padded), train=False)

  def posterior_mean(self, x):
    """(B, H, W, C) images -> (B, latent_dim) means of q(z|x)."""
    return self.posterior(x)[0]
