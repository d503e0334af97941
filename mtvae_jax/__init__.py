"""Multitask variational autoencoders (Gaussian and VQ) in JAX/Flax."""
import os

CPU_CONVOLUTION_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'


def use_fast_cpu_convolutions():
  """Adds CPU_CONVOLUTION_FLAG to XLA_FLAGS: XLA:CPU then runs convolutions with Eigen, not YNNPACK.

  The models' train steps run up to 1.5x faster on CPUs that way (BENCHMARKS.md);
  results are the same to float32 rounding. Left out where XLA_FLAGS already
  names the flag (a user's own choice), where jaxlib predates it (< 0.10), and
  where a JAX backend has started, since XLA reads XLA_FLAGS once per process.
  Returns whether the flag was added.
  """
  import jaxlib.version  # pylint: disable=import-outside-toplevel
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  flags = os.environ.get('XLA_FLAGS', '')
  if (CPU_CONVOLUTION_FLAG.split('=')[0] in flags or jaxlib.version.__version_info__ < (0, 10)
      or getattr(xla_bridge, 'backends_are_initialized', lambda: False)()):
    return False
  os.environ['XLA_FLAGS'] = f'{flags} {CPU_CONVOLUTION_FLAG}'.strip()
  return True


use_fast_cpu_convolutions()

# pylint: disable=wrong-import-position
from mtvae_jax.completion import complete
from mtvae_jax.errors import UserError
from mtvae_jax.train import train_and_evaluate

__all__ = ['UserError', 'complete', 'train_and_evaluate', 'use_fast_cpu_convolutions']
