"""VQ-VAE (thesis 2.2) with optional conditioned decoder (3.2.3, 3.3.3)."""
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
  """(B, H, W, C) -> z_e (B, H / 2**L, W / 2**L, embedding_dim)."""
  hidden_sizes: Sequence[int]
  num_residual_layers: int
  embedding_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    for features in self.hidden_sizes:
      x = layers.leaky_relu(layers.batch_norm(train)(layers.down(features, 4, self.dtype)(x)))
    x = layers.leaky_relu(layers.Conv(self.hidden_sizes[-1], 3, dtype=self.dtype)(x))
    for _ in range(self.num_residual_layers):
      x = layers.ResidualLayer(self.dtype)(x)
    x = layers.leaky_relu(x)
    return layers.leaky_relu(layers.Conv(self.embedding_dim, 1, dtype=self.dtype)(x))


class VectorQuantizer(nn.Module):
  """Nearest-neighbour lookup in a K x D codebook with straight-through gradients."""
  num_embeddings: int
  embedding_dim: int

  def setup(self):
    bound = 1.0 / self.num_embeddings
    init = lambda key, shape: jax.random.uniform(key, shape, minval=-bound, maxval=bound)
    self.codebook = self.param('codebook', init, (self.num_embeddings, self.embedding_dim))

  def codes(self, z_e):
    """(..., D) -> (...) int32 index of the nearest codebook vector."""
    codebook = self.codebook
    distances = (jnp.sum(jnp.square(z_e), -1, keepdims=True)
                 - 2.0 * z_e @ codebook.T + jnp.sum(jnp.square(codebook), -1))
    return jnp.argmin(distances, axis=-1).astype(jnp.int32)

  def lookup(self, codes):
    """(...) int -> (..., D) codebook vectors.

    A one-hot matrix product rather than a gather: its codebook gradient is
    a product too, where a gather's is a scatter-add of every position into
    K rows, which took most of the VQ train step on a GPU (BENCHMARKS.md).
    HIGHEST precision keeps the vectors exact where f32 products would
    otherwise round to TF32.
    """
    one_hot = jax.nn.one_hot(codes, self.num_embeddings, dtype=self.codebook.dtype)
    return jnp.dot(one_hot, self.codebook, precision=jax.lax.Precision.HIGHEST)

  def __call__(self, z_e):
    """Returns z_q with the gradient of z_e (straight-through), z_q itself, and codes."""
    codes = self.codes(z_e)
    z_q = self.lookup(codes)
    return z_e + jax.lax.stop_gradient(z_q - z_e), z_q, codes


class Decoder(nn.Module):
  """z_q (B, h, w, D) [+ m] -> (B, Hp, Wp, C) in [0, 1]; mirrors the encoder.

  With m and conditioning 'dense', z_q and m are flattened, concatenated and
  mapped back to the (h, w, D) grid by one dense layer (thesis 3.2.3); with
  'spatial', m's features join z_q and every larger grid
  (models/conditioning.py).
  """
  hidden_sizes: Sequence[int]
  num_residual_layers: int
  out_channels: int
  conditioning: str = 'dense'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z_q, m=None, *, train):
    h, levels = conditioning.first_grid(z_q, m, self.conditioning, self.hidden_sizes,
                                        z_q.shape[1:], self.dtype)
    h = layers.leaky_relu(layers.Conv(self.hidden_sizes[-1], 3, dtype=self.dtype)(h))
    for _ in range(self.num_residual_layers):
      h = layers.ResidualLayer(self.dtype)(h)
    h = layers.leaky_relu(h)
    h = conditioning.upsample(h, levels, tuple(reversed(self.hidden_sizes[:-1])), 4, train,
                              self.dtype)
    return nn.sigmoid(layers.up(self.out_channels, 4, self.dtype)(h))


class VQVAE(base.MultitaskAutoencoder):
  """Encoder, quantiser and the decoders of the method."""
  hidden_sizes: Sequence[int]
  num_residual_layers: int
  num_embeddings: int
  embedding_dim: int
  commitment_cost: float
  conditioning: str = 'dense'   # how cond_decoder takes in m: conditioning.CONDITIONINGS
  # Of the convolutions and matrix products (config.PRECISIONS); the quantiser's distances and
  # lookup stay float32.
  dtype: Any = jnp.float32

  def setup(self):
    channels = self.image_shape[-1]
    self.padded, _ = self.grids(len(self.hidden_sizes))
    self.encoder = Encoder(self.hidden_sizes, self.num_residual_layers, self.embedding_dim,
                           self.dtype)
    self.quantizer = VectorQuantizer(self.num_embeddings, self.embedding_dim)
    for name in methods.METHODS[self.method].decoders:  # m reaches only methods.CONDITIONED
      setattr(self, name, Decoder(self.hidden_sizes, self.num_residual_layers, channels,
                                  self.conditioning, self.dtype))

  def encode(self, x, key=None, *, train):
    """Returns the straight-through z_q (B, h, w, D) and the VQ loss term."""
    del key  # the encoder is deterministic
    z_e = self.encoder(layers.pad_to(x, *self.padded), train=train)
    z_q_st, z_q, _ = self.quantizer(z_e)
    codebook, commitment = losses.vq_terms(z_e, z_q, self.commitment_cost)
    return z_q_st, {'vq': codebook + commitment}

  def codes(self, x):
    """(B, H, W, C) images -> (B, h, w) int32 codebook indices (batch norm in inference mode)."""
    return self.quantizer.codes(self.encoder(layers.pad_to(x, *self.padded), train=False))

  def lookup(self, codes):
    """(B, h, w) codebook indices -> z_q (B, h, w, D), the decoders' input."""
    return self.quantizer.lookup(codes)
