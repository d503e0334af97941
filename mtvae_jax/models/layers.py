"""Building blocks shared by the Gaussian VAE and the VQ-VAE.

Paddings follow the PyTorch layers of the thesis's code base: a 3x3 or 4x4
stride-2 convolution with padding 1 halves an even side, and `up` doubles it
like ConvTranspose2d(k, stride=2, padding=1, output_padding=k % 2).
"""
import math

import flax.linen as nn
import jax.numpy as jnp

LEAKY_SLOPE = 0.01


def leaky_relu(x):
  return nn.leaky_relu(x, LEAKY_SLOPE)


def batch_norm(train):
  # momentum 0.9 is PyTorch's default momentum 0.1 written as flax's decay.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)


def down(features, kernel):
  """Stride-2 convolution: (B, 2h, 2w, c) -> (B, h, w, features)."""
  return nn.Conv(features, (kernel, kernel), strides=2, padding=1)


def up(features, kernel):
  """Stride-2 transposed convolution: (B, h, w, c) -> (B, 2h, 2w, features)."""
  # lax.conv_transpose padding equivalent to torch padding=1, output_padding=k%2.
  pad = (kernel - 2, kernel - 1 - 1 + kernel % 2)
  return nn.ConvTranspose(features, (kernel, kernel), strides=(2, 2), padding=(pad, pad))


class ResidualLayer(nn.Module):
  """x + conv1x1(relu(conv3x3(x))), the VQ-VAE paper's residual block."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(x.shape[-1], (3, 3), padding=1, use_bias=False)(x))
    return x + nn.Conv(x.shape[-1], (1, 1), use_bias=False)(h)


def merge_condition(z, m, shape):
  """Flatten z and m, concatenate, and map with one dense layer to `shape`.

  z: (B, ...), m: (B, H, W, 1 + C) or None -> (B, *shape). Call inside a
  compact method: the dense layer belongs to the calling module.
  """
  batch = z.shape[0]
  h = z.reshape(batch, -1)
  if m is not None:
    h = jnp.concatenate([h, m.reshape(batch, -1)], axis=-1)
  return nn.Dense(math.prod(shape))(h).reshape(batch, *shape)


def padded_side(side, num_down):
  """Smallest multiple of 2**num_down that holds `side`."""
  step = 2 ** num_down
  return -(-side // step) * step


def pad_to(x, height, width):
  """Zero-pad (B, H, W, C) at the bottom/right to (B, height, width, C)."""
  return jnp.pad(x, ((0, 0), (0, height - x.shape[1]), (0, width - x.shape[2]), (0, 0)))
