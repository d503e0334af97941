"""Building blocks shared by the Gaussian VAE and the VQ-VAE.

Paddings follow the PyTorch layers of the thesis's code base: a 3x3 or 4x4
stride-2 convolution with padding 1 halves an even side, and `up` doubles it
like ConvTranspose2d(k, stride=2, padding=1, output_padding=k % 2).

XLA's CPU backend runs lhs-dilated convolutions (a transposed convolution,
and the input gradient of a strided one) many times slower than stride-1
ones. So `up` runs as four stride-1 convolutions, one per output phase, and
`down`'s tangent in its input as four stride-1 convolutions of the input's
phases, whose transpose (the input gradient) is stride-1 convolutions too.
Where XLA's own gradient of a layer is slow, the layer is a jax.custom_jvp
function whose tangent, linear in the tangents, is written in the form
whose transpose is the fast gradient; so every layer has forward- and
reverse-mode derivatives. On grids smaller than the kernel (the last levels
of a network on 8x8 images), XLA:CPU's convolution is many times slower
still (BENCHMARKS.md): there a convolution is a matrix product of the
image's patches (`conv_by_matmul`), whose plain derivatives are matrix
products too.
"""
from typing import Any

import flax.linen as nn
import jax
from jax.custom_derivatives import SymbolicZero
import jax.numpy as jnp
import numpy as np

LEAKY_SLOPE = 0.01
# Layers with at most this many output channels (an image's) get forms of
# their own, as XLA's kernels are slow for so few channels.
IMAGE_CHANNELS = 4
_NHWC = ('NHWC', 'HWIO', 'NHWC')


def leaky_relu(x):
  return nn.leaky_relu(x, LEAKY_SLOPE)


def batch_norm(train):
  # momentum 0.9 is PyTorch's default momentum 0.1 written as flax's decay.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)


def down(features, kernel, dtype=jnp.float32):
  """Stride-2 convolution: (B, 2h, 2w, c) -> (B, h, w, features)."""
  return Conv(features, kernel, stride=2, dtype=dtype)


def up(features, kernel, dtype=jnp.float32):
  """Stride-2 transposed convolution: (B, h, w, c) -> (B, 2h, 2w, features)."""
  return ConvTranspose(features, kernel, dtype=dtype)


def computed_in(dtype, f, *args):
  """f(*args) on the arrays of `args` cast to `dtype`, the result cast back to their dtype.

  A layer's product runs in its computation dtype while parameters and
  activations keep theirs; in float32 the casts are no-ops.
  """
  result_type = jnp.result_type(*jax.tree.leaves(args))
  return f(*jax.tree.map(lambda a: a.astype(dtype), args)).astype(result_type)


def up_padding(kernel):
  """lax.conv_transpose padding of `up`: torch's padding=1, output_padding=kernel % 2."""
  return kernel - 2, kernel - 2 + kernel % 2


def _small(x, kernel):
  """Whether the grid of x (B, H, W, c) is smaller than the kernel (kh, kw, c, f) on a side."""
  return x.shape[1] < kernel.shape[0] or x.shape[2] < kernel.shape[1]


def conv_by_matmul(x, kernel, padding, stride=1):
  """_conv as one matrix product: (B * h' * w', kh * kw * c) patches by (kh * kw * c, f).

  The patch of each output position is its kh * kw shifted windows of the
  padded x side by side, in the kernel's (row, column, channel) order.
  Padding may be negative (a crop), as in lax.conv_general_dilated.
  """
  (low_h, high_h), (low_w, high_w) = padding
  kh, kw, _, features = kernel.shape
  x = jax.lax.pad(x, jnp.zeros((), x.dtype),
                  ((0, 0, 0), (low_h, high_h, 0), (low_w, high_w, 0), (0, 0, 0)))
  height, width = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  patches = jnp.concatenate(
      [x[:, i:i + stride * (height - 1) + 1:stride, j:j + stride * (width - 1) + 1:stride]
       for i in range(kh) for j in range(kw)], axis=-1)
  return (patches.reshape(-1, patches.shape[-1]) @ kernel.reshape(-1, features)).reshape(
      x.shape[0], height, width, features)


def _conv(x, kernel, padding, stride=1):
  """lax.conv_general_dilated in NHWC / HWIO with padding ((low, high), (low, high)); a
  matrix product of patches on a grid smaller than the kernel."""
  if _small(x, kernel):
    return conv_by_matmul(x, kernel, padding, stride)
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=_NHWC)


# _conv(x, K) with K as the input, read as f images of c channels, and x as
# the window, read as a kernel from c to B channels; its transpose in K (the
# kernel gradient) then convolves the output gradient with x.
_KERNEL_AS_INPUT = jax.lax.ConvDimensionNumbers((3, 2, 0, 1), (0, 3, 1, 2), (3, 0, 1, 2))


def _conv_in_kernel(x, kernel, padding):
  """_conv(x, kernel, padding) (stride 1) as a convolution of the kernel by x, both reversed."""
  padding = [(side - taps + low, side - taps + high)
             for side, taps, (low, high) in zip(x.shape[1:3], kernel.shape[:2], padding)]
  return jax.lax.conv_general_dilated(jnp.flip(kernel, (0, 1)), jnp.flip(x, (1, 2)), (1, 1),
                                      padding, dimension_numbers=_KERNEL_AS_INPUT)


def _taps(kernel, shift):
  """The taps t of one kernel axis with t + shift even, read at input offsets (t + shift) / 2.

  Returns (first tap, (low, high) padding of the stride-1 convolution with
  taps first, first + 2, ...), or None where no tap qualifies.
  """
  first = shift % 2
  if first >= kernel:
    return None
  last = kernel - 1 - (kernel - 1 - first) % 2
  return first, (-((first + shift) // 2), (last + shift) // 2)


def conv_transpose_by_phases(x, kernel, convolve=_conv):
  """`up`'s transposed convolution as four stride-1 convolutions, one per output phase.

  x: (B, h, w, c), kernel: (k, k, c, f) as nn.ConvTranspose holds it, k in
  (3, 4) -> (B, 2h, 2w, f). Output row 2i + r of the lhs-dilated form sums
  x[i + (t + r - low) / 2] K[t] over the taps t of parity (r + low) % 2, so
  each phase (r, s) is a plain convolution of x with every other tap, and
  no multiply touches an inserted zero; the phases are then interleaved.
  convolve(x, taps, padding) is that plain convolution (_conv or a form of it).
  """
  batch, height, width, _ = x.shape
  low = up_padding(kernel.shape[0])[0]
  phases = [_taps(kernel.shape[0], r - low) for r in (0, 1)]
  rows = [jnp.stack([convolve(x, kernel[ty::2, tx::2], (py, px)) for tx, px in phases], axis=3)
          for ty, py in phases]
  return jnp.stack(rows, axis=2).reshape(batch, 2 * height, 2 * width, kernel.shape[-1])


def _zero(tangent):
  return isinstance(tangent, SymbolicZero)


def _sum(terms, out):
  """The sum of a tangent's terms; zeros like `out` for none."""
  return sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out)


def _bilinear(x_tangent, kernel_tangent):
  """Makes f(x, kernel), linear in each argument, a jax.custom_jvp function.

  Its tangent is x_tangent(x_dot, kernel) + kernel_tangent(x, kernel_dot):
  the same linear maps as f, written in the forms whose transposes (the
  gradients) XLA runs fastest.
  """
  def make(f):
    f = jax.custom_jvp(f)

    def jvp(primals, tangents):
      (x, kernel), (x_dot, kernel_dot) = primals, tangents
      out = f(x, kernel)
      terms = ([] if _zero(x_dot) else [x_tangent(x_dot, kernel)]) + (
          [] if _zero(kernel_dot) else [kernel_tangent(x, kernel_dot)])
      return out, _sum(terms, out)

    f.defjvp(jvp, symbolic_zeros=True)
    return f
  return make


def _dilated(x, kernel):
  """conv_transpose_by_phases as XLA's lhs-dilated convolution."""
  padding = up_padding(kernel.shape[0])
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), (padding, padding), lhs_dilation=(2, 2),
                                      dimension_numbers=_NHWC)


def _up_kernel_tangent(x, kernel):
  """conv_transpose_by_phases, with each phase as _conv_in_kernel for an image's few channels."""
  return conv_transpose_by_phases(
      x, kernel, _conv_in_kernel if kernel.shape[-1] <= IMAGE_CHANNELS else _conv)


@_bilinear(_dilated, _up_kernel_tangent)
def conv_up(x, kernel):
  """`up`'s transposed convolution: (B, h, w, c), (k, k, c, f) -> (B, 2h, 2w, f).

  By phases, except for an image's few channels (f <= 4), where XLA runs
  the lhs-dilated form faster than four phases of so few channels. The
  tangent in x is the lhs-dilated form, whose transpose (the input
  gradient) is one stride-2 convolution instead of four phases' gradients;
  the tangent in the kernel is by phases, whose transposes are much faster
  kernel gradients than the lhs-dilated form's.
  """
  if kernel.shape[-1] <= IMAGE_CHANNELS:
    return _dilated(x, kernel)
  return conv_transpose_by_phases(x, kernel)


def _strided(x, kernel):
  """Stride-2 convolution, padding (k - 1) // 2: (B, 2h, 2w, c), (k, k, c, f) -> (B, h, w, f)."""
  pad = (kernel.shape[0] - 1) // 2
  return _conv(x, kernel, ((pad, pad), (pad, pad)), stride=2)


def _strided_by_phases(x, kernel):
  """_strided as the sum of four stride-1 convolutions, one per phase x[:, r::2, s::2] of x.

  Input row 2a + r meets output row i through the taps t of parity
  (r + pad) % 2, at a = i + (t - r - pad) / 2.
  """
  batch, height, width, channels = x.shape
  pad = (kernel.shape[0] - 1) // 2
  grid = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
  terms = []
  for r in (0, 1):
    for s in (0, 1):
      rows, cols = _taps(kernel.shape[0], -r - pad), _taps(kernel.shape[0], -s - pad)
      if rows and cols:
        terms.append(_conv(grid[:, :, r, :, s], kernel[rows[0]::2, cols[0]::2], (rows[1], cols[1])))
  return sum(terms[1:], terms[0])


@_bilinear(_strided_by_phases, _strided)
def conv_down(x, kernel):
  """`down`'s convolution, (B, 2h, 2w, c), (k, k, c, f) -> (B, h, w, f); sides must be even.

  XLA's own stride-2 convolution; the tangent in x goes through
  _strided_by_phases, the same linear map, so that reverse mode transposes
  stride-1 convolutions instead of running the lhs-dilated convolution that
  is the strided one's transpose.
  """
  if x.shape[1] % 2 or x.shape[2] % 2:
    raise ValueError(f'conv_down needs even sides, got {x.shape}')
  return _strided(x, kernel)


def _same_padding(kernel):
  return (((kernel.shape[0] - 1) // 2,) * 2,) * 2


def _same(x, kernel):
  """Stride-1 convolution, padding (k - 1) // 2: (B, H, W, c), (k, k, c, f) -> (B, H, W, f)."""
  return _conv(x, kernel, _same_padding(kernel))


def _same_in_kernel(x, kernel):
  return _conv_in_kernel(x, kernel, _same_padding(kernel))


@_bilinear(_same, _same_in_kernel)
def conv_to_image(x, kernel):
  """_same for a layer with an image's few output channels (32 -> 3).

  The tangent in the kernel is _same_in_kernel, so that the kernel gradient
  convolves the output gradient with x: XLA's own kernel gradient would
  first copy x with its batch axis innermost, a slow transpose of the
  larger tensor.
  """
  return _same(x, kernel)


def conv(x, kernel, stride=1):
  """The models' convolutions, stride 1 or 2, padding (k - 1) // 2.

  x: (B, H, W, c), kernel: (k, k, c, f) -> (B, H / stride, W / stride, f).
  Stride 2 is conv_down (on a grid smaller than the kernel, conv_by_matmul
  with its own derivatives); a 1x1 kernel runs as a matrix product, whose
  kernel gradient XLA's CPU backend runs faster than a 1x1 convolution's;
  a layer with an image's few output channels is conv_to_image.
  """
  if stride == 2:
    return _strided(x, kernel) if _small(x, kernel) else conv_down(x, kernel)
  if kernel.shape[0] == 1:
    return (x.reshape(-1, x.shape[-1]) @ kernel[0, 0]).reshape(*x.shape[:-1], kernel.shape[-1])
  if kernel.shape[-1] <= IMAGE_CHANNELS:
    return conv_to_image(x, kernel)
  return _same(x, kernel)


class Conv(nn.Module):
  """nn.Conv(features, (k, k), strides=stride, padding=(k - 1) // 2), computed by `conv`.

  The same parameters, initialisers and class name as nn.Conv, so parameter
  paths stay Conv_<i>; the convolution computes in `dtype` (computed_in).
  """
  features: int
  kernel_size: int
  stride: int = 1
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
    kernel = self.param('kernel', nn.initializers.lecun_normal(), shape)
    y = computed_in(self.dtype, lambda x, kernel: conv(x, kernel, self.stride), x, kernel)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros_init(), (self.features,))
    return y


class ConvTranspose(nn.Module):
  """nn.ConvTranspose(features, (k, k), strides=2, padding=up_padding(k)), by phases.

  The same parameters (kernel (k, k, c, features), bias), initialisers and
  class name as nn.ConvTranspose, so parameter paths stay ConvTranspose_<i>;
  the convolution computes in `dtype` (computed_in).
  """
  features: int
  kernel_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
    kernel = self.param('kernel', nn.initializers.lecun_normal(), shape)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    # On a grid smaller than the kernel, phases by conv_by_matmul, whose own derivatives are fast.
    transpose = conv_transpose_by_phases if _small(x, kernel[::2, ::2]) else conv_up
    return computed_in(self.dtype, transpose, x, kernel) + bias


class ResidualLayer(nn.Module):
  """x + conv1x1(relu(conv3x3(x))), the VQ-VAE paper's residual block."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.relu(Conv(x.shape[-1], 3, use_bias=False, dtype=self.dtype)(x))
    return x + Conv(x.shape[-1], 1, use_bias=False, dtype=self.dtype)(h)


@jax.custom_jvp
def concat_matmul(inputs, kernel):
  """concatenate(inputs, -1) @ kernel: tuple of (B, n_i), (sum n_i, f) -> (B, f).

  The tangent is one product per input with its rows of the kernel, so
  reverse mode computes each input's gradient on its own and drops those
  nobody uses (a mask's), instead of the whole concatenation's gradient.
  """
  return jnp.concatenate(inputs, axis=-1) @ kernel


def _concat_matmul_jvp(primals, tangents):
  inputs, kernel = primals
  inputs_dot, kernel_dot = tangents
  x = jnp.concatenate(inputs, axis=-1)
  ends = np.cumsum([x_i.shape[-1] for x_i in inputs])
  terms = [x_dot @ kernel[end - x_i.shape[-1]:end]
           for x_i, x_dot, end in zip(inputs, inputs_dot, ends) if not _zero(x_dot)]
  if not _zero(kernel_dot):
    terms.append(x @ kernel_dot)
  out = x @ kernel
  return out, _sum(terms, out)


concat_matmul.defjvp(_concat_matmul_jvp, symbolic_zeros=True)


class Dense(nn.Module):
  """nn.Dense applied to the concatenation of its inputs.

  inputs: arrays (B, n_i) -> (B, features). The same parameters (kernel
  (sum n_i, features), bias), initialisers and class name as nn.Dense, so
  parameter paths stay Dense_<i>; the product computes in `dtype` (computed_in).
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, *inputs):
    width = sum(x.shape[-1] for x in inputs)
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (width, self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    return computed_in(self.dtype, concat_matmul, inputs, kernel) + bias


def padded_side(side, num_down):
  """Smallest multiple of 2**num_down that holds `side`."""
  step = 2 ** num_down
  return -(-side // step) * step


def pad_to(x, height, width):
  """Zero-pad (B, H, W, C) at the bottom/right to (B, height, width, C)."""
  return jnp.pad(x, ((0, 0), (0, height - x.shape[1]), (0, width - x.shape[2]), (0, 0)))
