"""Building blocks shared by the Gaussian VAE and the VQ-VAE.

Paddings follow the PyTorch layers of the thesis's code base: a 3x3 or 4x4
stride-2 convolution with padding 1 halves an even side, and `up` doubles it
like ConvTranspose2d(k, stride=2, padding=1, output_padding=k % 2).
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LEAKY_SLOPE = 0.01
_NHWC = ('NHWC', 'HWIO', 'NHWC')


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
  return ConvTranspose(features, kernel)


def up_padding(kernel):
  """lax.conv_transpose padding of `up`: torch's padding=1, output_padding=kernel % 2."""
  return kernel - 2, kernel - 2 + kernel % 2


@functools.lru_cache(maxsize=None)
def _up_phases(kernel):
  """Per output phase r in (0, 1), the taps of `up` along one axis, as (input offsets, taps).

  Output 2a + r of the transposed convolution (lhs-dilated input, padding
  up_padding(kernel)) sums x[a + d] * K[t] over t = 2d - r + padding_low.
  """
  low = up_padding(kernel)[0]
  phases = []
  for r in (0, 1):
    taps = [t for t in range(kernel) if (t + r - low) % 2 == 0]
    phases.append((tuple((t + r - low) // 2 for t in taps), np.array(taps)))
  return tuple(phases)


def conv_transpose_by_phases(x, kernel):
  """`up`'s transposed convolution as four stride-1 convolutions, one per output phase.

  x: (B, h, w, c), kernel: (k, k, c, f) as nn.ConvTranspose holds it -> (B, 2h, 2w, f).
  Each phase (r, s) of the output grid is a plain convolution of x with the
  taps of K that land on it, so no multiply touches the zeros that
  lhs dilation would insert; the phases are then interleaved (depth to space).
  """
  batch, height, width, _ = x.shape
  phases = _up_phases(kernel.shape[0])
  rows = []
  for dy, ty in phases:
    cols = []
    for dx, tx in phases:
      padding = ((-dy[0], dy[-1]), (-dx[0], dx[-1]))
      cols.append(jax.lax.conv_general_dilated(
          x, kernel[ty][:, tx], (1, 1), padding, dimension_numbers=_NHWC))
    rows.append(jnp.stack(cols, axis=3))
  return jnp.stack(rows, axis=2).reshape(batch, 2 * height, 2 * width, kernel.shape[-1])


class ConvTranspose(nn.Module):
  """nn.ConvTranspose(features, (k, k), strides=2, padding=up_padding(k)), computed by phases.

  The same parameters (kernel (k, k, c, features), bias) and initialisers as
  nn.ConvTranspose, and the same class name, so parameter paths stay
  ConvTranspose_<i>. XLA's CPU backend runs lhs-dilated convolutions and
  their gradients an order of magnitude slower than plain ones.
  """
  features: int
  kernel_size: int

  @nn.compact
  def __call__(self, x):
    shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
    kernel = self.param('kernel', nn.initializers.lecun_normal(), shape)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    return conv_transpose_by_phases(x, kernel) + bias


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
