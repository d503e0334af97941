"""The models' convolutions and products by oneDNN on CPUs, through XLA:CPU's custom calls.

jaxlib's x86-64 Linux build ships oneDNN and runs `__onednn$convolution`
(oneDNN's forward convolution) and `__onednn$matmul` custom calls, but XLA
emits them only under a build option jaxlib leaves off. Emitted here, they
run the models' forward and input-gradient convolutions (3x3, stride 2 and
`up`'s phases), 1x1 convolutions and dense layers, and the train steps run
3-11 % faster than with XLA's Eigen and YNNPACK kernels (BENCHMARKS.md).
Kernel gradients of convolutions stay XLA's: oneDNN's forward kernels are
2x slower at them.

The calls' config format is internal to XLA and has changed between
versions, and a config the running XLA reads differently aborts the
process, so `conv` and `matmul` emit them only for the jaxlib versions in
ONEDNN_JAXLIBS; elsewhere, on other platforms, with MTVAE_JAX_ONEDNN=0 and
in programs over several devices they are XLA's operations. Both compute
the same function to float32 rounding. Autodiff and vmap of a convolution
go through XLA's convolution; a product's gradients are products again.

XLA cannot serialize an executable that holds these calls, so JAX's persistent
compilation cache skips the train and eval steps (recompiled in each
process, 1.5-4 s on 2 cores) and warns each time; the warning is silenced
below, since the rest of the program is still cached.
"""
import functools
import json
import os
import platform
import warnings

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir
from jax._src.interpreters import mlir as mlir_internal  # custom_call with a backend_config

ONEDNN_JAXLIBS = {(0, 10, 2)}  # versions whose config format this module writes, checked by tests
_NHWC = ('NHWC', 'HWIO', 'NHWC')


@functools.cache
def supported():
  """Whether this jaxlib has the calls in the format written here: x86-64 Linux, ONEDNN_JAXLIBS."""
  import jaxlib.version  # pylint: disable=import-outside-toplevel
  return (platform.system() == 'Linux' and platform.machine() == 'x86_64'
          and tuple(jaxlib.version.__version_info__[:3]) in ONEDNN_JAXLIBS)


def enabled():
  """Whether `conv` and `matmul` emit oneDNN calls (CPUs): supported(), MTVAE_JAX_ONEDNN != 0."""
  return supported() and os.environ.get('MTVAE_JAX_ONEDNN', '1') != '0'


if supported():
  warnings.filterwarnings(
      'ignore', category=UserWarning,
      message="Error writing persistent compilation cache entry for .*std::bad_alloc")


def xla_conv(x, kernel, *, strides, padding):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


def conv(x, kernel, strides, padding):
  """lax.conv_general_dilated(x, kernel, strides, padding) in NHWC / HWIO, by oneDNN on CPUs.

  x: (B, H, W, c), kernel: (kh, kw, c, f), padding: ((low, high), (low, high))
  -> (B, H', W', f).
  """
  params = dict(strides=tuple(strides), padding=tuple(tuple(p) for p in padding))
  if not enabled():
    return xla_conv(x, kernel, **params)
  return conv_p.bind(x, kernel, **params)


def _register_lowerings(primitive, xla_fn, target, config):
  """`xla_fn` (XLA's operation) on every backend; on CPUs the oneDNN call `target`.

  The call's backend config is config(**params). Programs over several
  devices keep XLA's operation: XLA's SPMD partitioner knows no sharding of
  the call and would gather its operands.
  """
  xla_lowering = mlir.lower_fun(xla_fn, multiple_results=False)

  def cpu_lowering(ctx, *args, **params):
    if getattr(ctx.module_context.axis_context, 'num_devices', 1) != 1:
      return xla_lowering(ctx, *args, **params)
    out_type = mlir.aval_to_ir_type(ctx.module_context, ctx.avals_out[0])
    return mlir_internal.custom_call(target, result_types=[out_type], operands=list(args),
                                     backend_config=json.dumps(config(**params)),
                                     api_version=1).results

  mlir.register_lowering(primitive, xla_lowering)
  mlir.register_lowering(primitive, cpu_lowering, platform='cpu')


def _abstract_eval(xla_fn):
  def shape(*args, **params):
    out = jax.eval_shape(functools.partial(xla_fn, **params), *args)
    return jax.core.ShapedArray(out.shape, out.dtype)
  return shape


def _conv_config(strides, padding):
  """The NHWC / HWIO axes, and the window as XLA's convolution has it.

  jaxlib 0.10.2 reads 0-based axes and plain window values (other XLA
  versions' sources add 1 to some of them).
  """
  return {'onednn_conv_config': {
      'dims': 4, 'feature_groups': 1,
      'input': {'data': {'batch_dim': 0, 'feature_dim': 3, 'spatial_dims': [1, 2]}},
      'kernel': {'filter': {'output_feature_dim': 3, 'input_feature_dim': 2,
                            'spatial_dims': [0, 1]}},
      'output': {'data': {'batch_dim': 0, 'feature_dim': 3, 'spatial_dims': [1, 2]}},
      'window': {'pad_left': [low for low, _ in padding],
                 'pad_right': [high for _, high in padding],
                 'strides': list(strides), 'window_dilations': [1, 1]}}}


conv_p = Primitive('mtvae_onednn_conv')
conv_p.def_impl(xla_conv)
conv_p.def_abstract_eval(_abstract_eval(xla_conv))
_register_lowerings(conv_p, xla_conv, '__onednn$convolution', _conv_config)


def _conv_transpose(argnum):
  """The transpose rule in x (argnum 0) or the kernel (1): that of XLA's convolution."""
  def rule(cotangent, x, kernel, **params):
    args = [x, kernel]
    def convolve(arg):
      args[argnum] = arg
      return xla_conv(*args, **params)
    aval = args[argnum].aval
    primal = jax.ShapeDtypeStruct(aval.shape, aval.dtype)
    return jax.linear_transpose(convolve, primal)(cotangent)[0]
  return rule


ad.defbilinear(conv_p, _conv_transpose(0), _conv_transpose(1))


def _batch(args, dims, **params):
  """A batch of inputs x joins the image axis; a batch of kernels runs XLA's convolution."""
  (x, kernel), (x_dim, kernel_dim) = args, dims
  if kernel_dim is None:
    x = jax.numpy.moveaxis(x, x_dim, 0)
    y = conv_p.bind(x.reshape(-1, *x.shape[2:]), kernel, **params)
    return y.reshape(*x.shape[:2], *y.shape[1:]), 0
  convolve = functools.partial(xla_conv, **params)
  return jax.vmap(convolve, in_axes=(x_dim, kernel_dim))(x, kernel), 0


batching.primitive_batchers[conv_p] = _batch


# XLA's own threshold for handing a product to oneDNN: smaller ones lose to its overheads.
MIN_MATMUL_FLOPS = 1 << 24


def xla_matmul(a, b, *, transpose_a, transpose_b):
  return (a.T if transpose_a else a) @ (b.T if transpose_b else b)


def matmul(a, b, transpose_a=False, transpose_b=False):
  """op(a) @ op(b) of 2-D a, b, op transposing where asked, by oneDNN on CPUs (large products).

  oneDNN reads a transposed operand in place, where XLA first copies it:
  the kernel gradient of a 1x1 convolution, x^T @ dy, takes 2.7 ms against
  4.6 for 6272 x 256 x 256 (BENCHMARKS.md).
  """
  params = dict(transpose_a=transpose_a, transpose_b=transpose_b)
  (m, k), n = (a.shape[::-1] if transpose_a else a.shape), b.shape[0 if transpose_b else 1]
  if not enabled() or 2 * m * k * n < MIN_MATMUL_FLOPS:
    return xla_matmul(a, b, **params)
  return matmul_p.bind(a, b, **params)


matmul_p = Primitive('mtvae_onednn_matmul')
matmul_p.def_impl(xla_matmul)
matmul_p.def_abstract_eval(_abstract_eval(xla_matmul))
_register_lowerings(matmul_p, xla_matmul, '__onednn$matmul',
                    lambda **params: {'onednn_matmul_config': params})


def _a_transpose(cotangent, a, b, *, transpose_a, transpose_b):
  """op(a)'s cotangent is cotangent @ op(b)^T."""
  del a
  if transpose_a:
    return matmul(b, cotangent, transpose_a=transpose_b, transpose_b=True)
  return matmul(cotangent, b, transpose_b=not transpose_b)


def _b_transpose(cotangent, a, b, *, transpose_a, transpose_b):
  """op(b)'s cotangent is op(a)^T @ cotangent."""
  del b
  if transpose_b:
    return matmul(cotangent, a, transpose_a=True, transpose_b=transpose_a)
  return matmul(a, cotangent, transpose_a=not transpose_a)


ad.defbilinear(matmul_p, _a_transpose, _b_transpose)
batching.primitive_batchers[matmul_p] = lambda args, dims, **params: (
    jax.vmap(functools.partial(xla_matmul, **params), in_axes=dims)(*args), 0)
