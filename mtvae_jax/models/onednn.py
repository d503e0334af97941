"""The models' convolutions by oneDNN on CPUs, through a custom call that XLA:CPU carries.

jaxlib's x86-64 Linux build ships oneDNN and runs a `__onednn$convolution`
custom call with oneDNN's forward convolution, but XLA emits that call only
under a build option jaxlib leaves off. Emitted here, it runs the models'
forward and input-gradient convolutions (3x3, stride 2 and `up`'s phases)
5-10 % faster than XLA's Eigen convolutions (BENCHMARKS.md). Kernel
gradients stay XLA's: oneDNN's forward kernels are 2x slower at them.

The call's config format is internal to XLA and has changed between
versions, and a config the running XLA reads differently aborts the
process, so `conv` emits it only for the jaxlib versions in ONEDNN_JAXLIBS;
elsewhere, on other platforms, and with MTVAE_JAX_ONEDNN=0 it is XLA's
convolution. Both compute the same function to float32 rounding; autodiff
and vmap go through XLA's convolution rules. Programs over several devices
keep XLA's convolution: its SPMD partitioner would gather the call's operands.

XLA cannot serialize an executable that holds the call, so JAX's persistent
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
  """Whether the running jaxlib has the call in the format written here: x86-64 Linux, ONEDNN_JAXLIBS."""
  import jaxlib.version  # pylint: disable=import-outside-toplevel
  return (platform.system() == 'Linux' and platform.machine() == 'x86_64'
          and tuple(jaxlib.version.__version_info__[:3]) in ONEDNN_JAXLIBS)


def enabled():
  """Whether `conv` emits the oneDNN call (for CPUs): supported() and MTVAE_JAX_ONEDNN is not 0."""
  return supported() and os.environ.get('MTVAE_JAX_ONEDNN', '1') != '0'


if supported():
  warnings.filterwarnings('ignore', category=UserWarning,
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


conv_p = Primitive('mtvae_onednn_conv')
conv_p.def_impl(xla_conv)


@conv_p.def_abstract_eval
def _shape(x, kernel, **params):
  out = jax.eval_shape(functools.partial(xla_conv, **params), x, kernel)
  return jax.core.ShapedArray(out.shape, out.dtype)


def _config(strides, padding):
  """The call's backend config: the NHWC / HWIO axes, and the window as XLA's convolution has it."""
  return json.dumps({'onednn_conv_config': {
      'dims': 4, 'feature_groups': 1,
      'input': {'data': {'batch_dim': 0, 'feature_dim': 3, 'spatial_dims': [1, 2]}},
      'kernel': {'filter': {'output_feature_dim': 3, 'input_feature_dim': 2, 'spatial_dims': [0, 1]}},
      'output': {'data': {'batch_dim': 0, 'feature_dim': 3, 'spatial_dims': [1, 2]}},
      'window': {'pad_left': [low for low, _ in padding], 'pad_right': [high for _, high in padding],
                 'strides': list(strides), 'window_dilations': [1, 1]}}})


_xla_lowering = mlir.lower_fun(xla_conv, multiple_results=False)


def _cpu_lowering(ctx, x, kernel, *, strides, padding):
  if getattr(ctx.module_context.axis_context, 'num_devices', 1) != 1:
    # XLA's SPMD partitioner knows no sharding of the call and would gather its operands.
    return _xla_lowering(ctx, x, kernel, strides=strides, padding=padding)
  out_type = mlir.aval_to_ir_type(ctx.module_context, ctx.avals_out[0])
  return mlir_internal.custom_call(
      '__onednn$convolution', result_types=[out_type], operands=[x, kernel],
      backend_config=_config(strides, padding), api_version=1).results


mlir.register_lowering(conv_p, _xla_lowering)
mlir.register_lowering(conv_p, _cpu_lowering, platform='cpu')


def _transpose(argnum):
  """The transpose rule in x (argnum 0) or the kernel (1): that of XLA's convolution."""
  def rule(cotangent, x, kernel, **params):
    args = [x, kernel]
    def convolve(arg):
      args[argnum] = arg
      return xla_conv(*args, **params)
    aval = args[argnum].aval
    return jax.linear_transpose(convolve, jax.ShapeDtypeStruct(aval.shape, aval.dtype))(cotangent)[0]
  return rule


ad.defbilinear(conv_p, _transpose(0), _transpose(1))


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
