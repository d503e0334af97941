"""Building blocks shared by the Gaussian VAE and the VQ-VAE.

Paddings follow the PyTorch layers of the thesis's code base: a 3x3 or 4x4
stride-2 convolution with padding 1 halves an even side, and `up` doubles it
like ConvTranspose2d(k, stride=2, padding=1, output_padding=k % 2).

Forward and input-gradient convolutions go through onednn.conv and matrix
products through onednn.matmul (oneDNN on CPUs); kernel gradients of
convolutions and lhs-dilated convolutions are XLA's.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtvae_jax.models import onednn

LEAKY_SLOPE = 0.01
_NHWC = ('NHWC', 'HWIO', 'NHWC')


def leaky_relu(x):
  return nn.leaky_relu(x, LEAKY_SLOPE)


def batch_norm(train):
  # momentum 0.9 is PyTorch's default momentum 0.1 written as flax's decay.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)


def down(features, kernel):
  """Stride-2 convolution: (B, 2h, 2w, c) -> (B, h, w, features)."""
  return Conv(features, kernel, stride=2)


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
      cols.append(onednn.conv(x, kernel[ty][:, tx], (1, 1), padding))
    rows.append(jnp.stack(cols, axis=3))
  return jnp.stack(rows, axis=2).reshape(batch, 2 * height, 2 * width, kernel.shape[-1])


def adjoint_kernel(kernel):
  """(k, k, c, f) -> (k, k, f, c), spatially reversed: the kernel of the adjoint convolution."""
  return jnp.flip(kernel, (0, 1)).swapaxes(2, 3)


def _conv_down(x, kernel):
  """Stride-2 convolution, padding 1 (`down`): (B, 2h, 2w, c), (k, k, c, f) -> (B, h, w, f)."""
  return onednn.conv(x, kernel, (2, 2), ((1, 1), (1, 1)))


def _kernel_grad(convolve, x, cotangent, kernel_shape):
  """d<convolve(x, K), cotangent>/dK, of shape kernel_shape, for a convolution linear in K."""
  kernel = jax.ShapeDtypeStruct(kernel_shape, x.dtype)
  return jax.linear_transpose(functools.partial(convolve, x), kernel)(cotangent)[0]


@jax.custom_vjp
def conv_down(x, kernel):
  """`down`'s convolution, (B, 2h, 2w, c), (k, k, c, f) -> (B, h, w, f), with a fast input gradient.

  The input gradient of a stride-2 convolution is `up`'s transposed
  convolution of the output gradient with adjoint_kernel(K) (the same
  paddings), which XLA would run lhs-dilated; here it runs by phases.
  Sides must be even, as the models' padded inputs are.
  """
  if x.shape[1] % 2 or x.shape[2] % 2:
    raise ValueError(f'conv_down needs even sides, got {x.shape}')
  return _conv_down(x, kernel)


def _conv_down_fwd(x, kernel):
  return conv_down(x, kernel), (x, kernel)


def _conv_down_bwd(residuals, cotangent):
  x, kernel = residuals
  return (conv_transpose_by_phases(cotangent, adjoint_kernel(kernel)),
          _kernel_grad(_conv_down, x, cotangent, kernel.shape))


conv_down.defvjp(_conv_down_fwd, _conv_down_bwd)


@jax.custom_vjp
def conv_up(x, kernel):
  """`up`'s transposed convolution, (B, h, w, c), (k, k, c, f) -> (B, 2h, 2w, f).

  By phases, except for an image's few channels (f <= 4): XLA's CPU
  convolutions then run the lhs-dilated form 4x faster than four phases of
  so few output channels. It is the adjoint of conv_down(., adjoint_kernel(K)),
  so its input gradient is that stride-2 convolution of the output
  gradient, and its kernel gradient is conv_down's kernel gradient with
  input and cotangent swapped. On grids of 16x16 and more the phases' own
  kernel gradients are cheaper (Eigen's kernel gradient then moves the
  batch axis of x innermost rather than that of the 4x larger output
  gradient; 20 against 15 ms alone for 16x16x32 -> 32x32x32), on smaller
  ones four convolutions cost more than the copy saves.
  """
  if kernel.shape[-1] <= 4:
    padding = up_padding(kernel.shape[0])
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), (padding, padding), lhs_dilation=(2, 2),
                                        dimension_numbers=_NHWC)
  return conv_transpose_by_phases(x, kernel)


def _conv_up_fwd(x, kernel):
  return conv_up(x, kernel), (x, kernel)


def _conv_up_bwd(residuals, cotangent):
  x, kernel = residuals
  adjoint = adjoint_kernel(kernel)
  if kernel.shape[-1] > 4 and min(x.shape[1:3]) >= 16:
    kernel_grad = _kernel_grad(conv_transpose_by_phases, x, cotangent, kernel.shape)
  else:
    kernel_grad = adjoint_kernel(_kernel_grad(_conv_down, cotangent, x, adjoint.shape))
  return _conv_down(cotangent, adjoint), kernel_grad


conv_up.defvjp(_conv_up_fwd, _conv_up_bwd)


# Dimension numbers of a kernel gradient taken with the roles of the two
# operands swapped: the output gradient (B, H, W, f) is the input, read as f
# images of B channels, and the layer input (B, H, W, c) is the window, read as
# a kernel from B to c channels; the result is (k, k, c, f), spatially flipped.
_SWAPPED = jax.lax.ConvDimensionNumbers(lhs_spec=(3, 0, 1, 2), rhs_spec=(3, 0, 1, 2),
                                        out_spec=(3, 2, 0, 1))


def _conv_same(x, kernel):
  padding = (kernel.shape[0] - 1) // 2
  return onednn.conv(x, kernel, (1, 1), ((padding, padding),) * 2)


@jax.custom_vjp
def conv_same(x, kernel):
  """Stride-1 convolution, padding (k - 1) // 2: (B, H, W, c), (k, k, c, f) -> (B, H', W', f).

  Its gradients are XLA's, except the kernel gradient of a layer with more
  input than output channels (an image layer, 32 -> 3): XLA's Eigen kernel
  gradient first moves the batch axis of the layer input innermost, a slow
  copy of the larger tensor; with the operands swapped (_SWAPPED) that copy
  falls on the smaller output gradient, 3x faster for 32 -> 3 on 32x32.
  """
  return _conv_same(x, kernel)


def _conv_same_fwd(x, kernel):
  return conv_same(x, kernel), (x, kernel)


def _conv_same_bwd(residuals, cotangent):
  x, kernel = residuals
  k = kernel.shape[0]
  padding = ((k - 1 - (k - 1) // 2,) * 2,) * 2   # of the adjoint convolution
  x_grad = onednn.conv(cotangent, adjoint_kernel(kernel), (1, 1), padding)
  if x.shape[-1] > kernel.shape[-1]:
    kernel_grad = jnp.flip(jax.lax.conv_general_dilated(
        cotangent, x, (1, 1), padding, dimension_numbers=_SWAPPED), (0, 1))
  else:
    kernel_grad = _kernel_grad(_conv_same, x, cotangent, kernel.shape)
  return x_grad, kernel_grad


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


def conv(x, kernel, stride=1):
  """The models' convolutions, stride 1 or 2, padding (k - 1) // 2.

  x: (B, H, W, c), kernel: (k, k, c, f) -> (B, H / stride, W / stride, f).

  1x1 kernels run as a matrix product (XLA's kernel gradient of a 1x1
  convolution is several times slower than the product's), stride 2 as
  conv_down, stride 1 as conv_same.
  """
  if kernel.shape[0] == 1 and stride == 1:
    y = onednn.matmul(x.reshape(-1, x.shape[-1]), kernel[0, 0])
    return y.reshape(*x.shape[:-1], kernel.shape[-1])
  if stride == 2:
    return conv_down(x, kernel)
  return conv_same(x, kernel)


class Conv(nn.Module):
  """nn.Conv(features, (k, k), strides=stride, padding=(k - 1) // 2), computed by `conv`.

  The same parameters, initialisers and class name as nn.Conv, so parameter
  paths stay Conv_<i>.
  """
  features: int
  kernel_size: int
  stride: int = 1
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
    y = conv(x, self.param('kernel', nn.initializers.lecun_normal(), shape), self.stride)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros_init(), (self.features,))
    return y


class ConvTranspose(nn.Module):
  """nn.ConvTranspose(features, (k, k), strides=2, padding=up_padding(k)), computed by conv_up.

  The same parameters (kernel (k, k, c, features), bias) and initialisers as
  nn.ConvTranspose, and the same class name, so parameter paths stay
  ConvTranspose_<i>. XLA's CPU backend runs lhs-dilated convolutions of
  many output channels, and their gradients, several times slower than
  plain ones.
  """
  features: int
  kernel_size: int

  @nn.compact
  def __call__(self, x):
    shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
    kernel = self.param('kernel', nn.initializers.lecun_normal(), shape)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    return conv_up(x, kernel) + bias


class ResidualLayer(nn.Module):
  """x + conv1x1(relu(conv3x3(x))), the VQ-VAE paper's residual block."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(Conv(x.shape[-1], 3, use_bias=False)(x))
    return x + Conv(x.shape[-1], 1, use_bias=False)(h)


@jax.custom_vjp
def concat_matmul(inputs, kernel):
  """concatenate(inputs, -1) @ kernel, with one product per input in the input gradient.

  inputs: tuple of (B, n_i), kernel: (sum n_i, f) -> (B, f). Autodiff of
  the concatenation would compute the whole input gradient (B, sum n_i) and
  then slice it; here each input gets its own product, so XLA drops the
  ones nobody uses (the conditioning m's: 128 x 2048 x 4096 in VQ
  configuration 2). Slicing the kernel in the forward pass instead would
  make its gradient a sum of zero-padded blocks.
  """
  return onednn.matmul(jnp.concatenate(inputs, axis=-1), kernel)


def _concat_matmul_fwd(inputs, kernel):
  return concat_matmul(inputs, kernel), (inputs, kernel)


def _concat_matmul_bwd(residuals, cotangent):
  inputs, kernel = residuals
  starts = np.cumsum([0] + [x.shape[-1] for x in inputs])
  input_grads = tuple(onednn.matmul(cotangent, kernel[a:b], transpose_b=True)
                      for a, b in zip(starts[:-1], starts[1:]))
  return input_grads, onednn.matmul(jnp.concatenate(inputs, axis=-1), cotangent, transpose_a=True)


concat_matmul.defvjp(_concat_matmul_fwd, _concat_matmul_bwd)


class Dense(nn.Module):
  """nn.Dense applied to the concatenation of its inputs, computed by concat_matmul.

  inputs: arrays (B, n_i) -> (B, features). The same parameters (kernel
  (sum n_i, features), bias), initialisers and class name as nn.Dense, so
  parameter paths stay Dense_<i>.
  """
  features: int

  @nn.compact
  def __call__(self, *inputs):
    width = sum(x.shape[-1] for x in inputs)
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (width, self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    return concat_matmul(inputs, kernel) + bias


def padded_side(side, num_down):
  """Smallest multiple of 2**num_down that holds `side`."""
  step = 2 ** num_down
  return -(-side // step) * step


def pad_to(x, height, width):
  """Zero-pad (B, H, W, C) at the bottom/right to (B, height, width, C)."""
  return jnp.pad(x, ((0, 0), (0, height - x.shape[1]), (0, width - x.shape[2]), (0, 0)))
