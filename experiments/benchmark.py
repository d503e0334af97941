"""Command line: python -m experiments.benchmark [--cases=gaussian1,vq2_multi] [--steps=30]
[--precision=bfloat16] [--out=f.json].

Times one jitted train step of mtvae_jax against the same step in PyTorch
(experiments/torch_reference.py; eager, and torch.compile with
--torch_compile) on the same machine in the same run, on the GPU when JAX
runs on one and PyTorch sees CUDA: Gaussian
configuration 1 and VQ configuration 2, methods none / multi / single, on
28x28x1 and 32x32x3 images, and method multi on 64x64x3 images (at most
LARGE_BATCH_SIZE per step) with each config.conditioning (a case name
ending in _spatial sets 'spatial'). --precision sets config.train.precision
of the JAX step and PyTorch's autocast (torch_reference.autocast); in
bfloat16 the JAX float32 step is timed too, for the speed-up. The steps of
the frameworks alternate and each figure is the median over --steps, so a
load that comes and goes hits all alike. Also reported: the JAX step's compile time from an
empty persistent compilation cache (cold) and from a filled one (cached), and
the peak host memory of each framework's step. The JAX step runs with the
XLA_FLAGS that cli.configure_jax sets, as the training command lines do (the
first line of output shows them). Mistakes in flags end the program with one
line and exit status 2.
"""
import ctypes
import ctypes.util
import fnmatch
import functools
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time

from absl import app
from absl import flags
import jax

from experiments import cli
import mtvae_jax
from mtvae_jax import config as config_lib
from mtvae_jax import loop
from mtvae_jax import methods
from mtvae_jax import models
from mtvae_jax import train

MODELS = (('gaussian', 1), ('vq', 2))
SHAPES = ((28, 28, 1), (32, 32, 3))
LARGE_SHAPE = (64, 64, 3)
LARGE_BATCH_SIZE = 16

_CASES = flags.DEFINE_list(
    'cases', [], 'Run only the cases whose name matches one of these patterns (fnmatch, '
    'a plain word matches as a substring), e.g. gaussian1_multi_28x28x1 or vq2_*.')
_STEPS = flags.DEFINE_integer('steps', 30, 'Timed steps per framework and case.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps per framework before timing.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 128, 'Images per step.')
_TORCH = flags.DEFINE_bool('torch', True, 'Time the PyTorch reference (needs .[bench]).')
_TORCH_COMPILE = flags.DEFINE_bool('torch_compile', False, 'Also time torch.compile.')
_PRECISION = flags.DEFINE_string(
    'precision', 'float32', 'config.train.precision of the JAX step, and the dtype of PyTorch\'s '
    f'autocast: one of {", ".join(config_lib.PRECISIONS)}.')
_OUT = flags.DEFINE_string('out', None, 'Write the results as a JSON list to this file.')


def case_names():
  return [f'{model}{preset}_{method}_{"x".join(map(str, shape))}'
          for model, preset in MODELS for method in methods.METHODS for shape in SHAPES] + [
              f'{model}{preset}_multi_{"x".join(map(str, LARGE_SHAPE))}{suffix}'
              for model, preset in MODELS for suffix in ('', '_spatial')]


def select(patterns):
  """The case names that match any pattern; all of them for no pattern."""
  names = case_names()
  if not patterns:
    return names
  chosen = [n for n in names if any(fnmatch.fnmatch(n, p if set(p) & set('*?[') else f'*{p}*')
                                    for p in patterns)]
  if not chosen:
    raise mtvae_jax.UserError(f'--cases={",".join(patterns)} matches no case: use patterns over '
                              f'{", ".join(names)}')
  return chosen


def parse_case(name, precision='float32'):
  """'vq2_multi_32x32x3' -> (config, (32, 32, 3)); suffix '_spatial': conditioning 'spatial'."""
  family, method, shape, *conditioning = name.split('_')
  config = config_lib.base_config(family[:-1], method, family[-1])
  config.conditioning = conditioning[0] if conditioning else 'dense'
  config.train.precision = precision
  shape = tuple(int(side) for side in shape.split('x'))
  return config_lib.resolve_for_images(config, shape), shape


def peak_memory_mib(run, steps):
  """Peak resident memory above the resting level while `run` runs `steps` times (Linux)."""
  status = pathlib.Path('/proc/self/status')
  if not status.exists():
    return None
  read = lambda key: next(int(line.split()[1]) for line in status.read_text().splitlines()
                          if line.startswith(key + ':'))
  libc = ctypes.util.find_library('c')
  if libc:  # return freed heap to the system, so that the resting level is the live memory
    ctypes.CDLL(libc).malloc_trim(0)
  pathlib.Path('/proc/self/clear_refs').write_text('5')  # restart VmHWM from the current RSS
  rest = read('VmRSS')
  for _ in range(steps):
    run()
  return (read('VmHWM') - rest) / 1024


class JaxStep:
  """mtvae_jax's jitted train step on one fixed batch, donating state as the train loop does."""

  def __init__(self, config, shape, batch_size):
    model = models.build_model(config, shape)
    self.state = train.create_train_state(config, model, shape, jax.random.key(0))
    self.images = jax.random.uniform(jax.random.key(1), (batch_size, *shape))
    self.key = jax.random.key(2)
    self.step_fn = functools.partial(train.train_step, config=config)

  def compile(self):
    """Traces and compiles the step; returns the seconds it took."""
    start = time.perf_counter()
    donate = (0,) if loop.donates_state(self.state) else ()
    self.compiled = jax.jit(self.step_fn, donate_argnums=donate).lower(
        self.state, self.images, self.key).compile()
    return time.perf_counter() - start

  def __call__(self):
    self.state, metrics = self.compiled(self.state, self.images, self.key)
    jax.block_until_ready((self.state, metrics))


class TorchStep:
  """The PyTorch reference's train step on one fixed batch, on the GPU where JAX runs on one."""

  def __init__(self, config, shape, batch_size, compile=False):  # pylint: disable=redefined-builtin
    import torch  # pylint: disable=import-outside-toplevel
    from experiments import torch_reference  # pylint: disable=import-outside-toplevel
    torch.manual_seed(0)
    self.torch = torch
    self.device = 'cuda' if jax.default_backend() == 'gpu' and torch.cuda.is_available() else 'cpu'
    self.step = torch_reference.TrainStep(config, shape, compile=compile, device=self.device)
    self.images = torch.rand(batch_size, shape[2], shape[0], shape[1], device=self.device)

  def __call__(self):
    self.step(self.images)
    if self.device == 'cuda':
      self.torch.cuda.synchronize()


def median_seconds(runs, steps):
  """Median seconds per call of each of `runs`, calling them in turn `steps` times."""
  times = [[] for _ in runs]
  for _ in range(steps):
    for run, record in zip(runs, times):
      start = time.perf_counter()
      run()
      record.append(time.perf_counter() - start)
  return [statistics.median(record) for record in times]


def run_case(name, steps, warmup, batch_size, use_torch, torch_compile, precision='float32'):
  """One case: compile times, then the interleaved timing and memory of each framework."""
  config, shape = parse_case(name, precision)
  batch_size = min(batch_size, LARGE_BATCH_SIZE) if shape == LARGE_SHAPE else batch_size
  jax_step = JaxStep(config, shape, batch_size)
  cold = jax_step.compile()
  jax.clear_caches()  # drop the in-memory executables: the next compile reads the disk cache
  cached = jax_step.compile()
  runs = {'jax': jax_step}
  result = {'name': name, 'precision': precision, 'batch_size': batch_size, 'jax_compile_s': cold,
            'jax_cached_compile_s': cached}
  if precision != 'float32':
    runs['jax_float32'] = JaxStep(parse_case(name)[0], shape, batch_size)
    runs['jax_float32'].compile()
  if use_torch:
    runs['torch'] = TorchStep(config, shape, batch_size)
    if torch_compile:
      runs['torch_compiled'] = TorchStep(config, shape, batch_size, compile=True)
      start = time.perf_counter()
      runs['torch_compiled']()
      result['torch_compile_s'] = time.perf_counter() - start
  for label, run in runs.items():
    result[f'{label}_peak_mib'] = peak_memory_mib(run, warmup)
  for label, seconds in zip(runs, median_seconds(list(runs.values()), steps)):
    result[f'{label}_step_ms'] = 1000 * seconds
    result[f'{label}_images_per_s'] = batch_size / seconds
  for key, label in RATIOS.items():
    if f'{label}_images_per_s' in result:
      result[key] = result['jax_images_per_s'] / result[f'{label}_images_per_s']
  return result


# /proc/cpuinfo flags of the units that multiply float32 and bfloat16 fastest -> their names.
CPU_FEATURES = {'avx512f': 'AVX-512', 'avx512_bf16': 'AVX512-BF16', 'amx_bf16': 'AMX-BF16'}


def cpu_name():
  """The CPU's model name and which of CPU_FEATURES it has, e.g. 'AMD EPYC (no AVX-512, ...)'."""
  cpuinfo = pathlib.Path('/proc/cpuinfo')
  if not cpuinfo.exists():
    return platform.processor()
  fields = dict(line.split(':', 1) for line in cpuinfo.read_text().split('\n\n')[0].splitlines()
                if ':' in line)
  fields = {key.strip(): value.strip() for key, value in fields.items()}
  flags = set(fields.get('flags', '').split())
  features = ', '.join(('' if flag in flags else 'no ') + name
                       for flag, name in CPU_FEATURES.items())
  return f'{fields.get("model name", platform.processor())} ({features})'


def machine(torch_version=None):
  load = ', '.join(f'{x:.2f}' for x in os.getloadavg())
  return (f'{cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__} on '
          f'{jax.devices()[0].device_kind}; '
          + (f'torch {torch_version}; ' if torch_version else '')
          + f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; load average {load}')


# The JAX step's speed over each other run's: ratio column -> run label.
RATIOS = {'ratio': 'torch', 'compiled_ratio': 'torch_compiled', 'float32_ratio': 'jax_float32'}


def table(results):
  columns = [('name', '{}'), ('jax_images_per_s', '{:.0f}'), ('torch_images_per_s', '{:.0f}'),
             ('ratio', '{:.2f}'), ('torch_compiled_images_per_s', '{:.0f}'),
             ('compiled_ratio', '{:.2f}'), ('jax_float32_images_per_s', '{:.0f}'),
             ('float32_ratio', '{:.2f}'), ('jax_compile_s', '{:.1f}'), ('jax_cached_compile_s', '{:.1f}'),
             ('jax_peak_mib', '{:.0f}'), ('torch_peak_mib', '{:.0f}')]
  columns = [(key, fmt) for key, fmt in columns if any(key in r for r in results)]
  rows = [[key for key, _ in columns]] + [
      [fmt.format(r[key]) if r.get(key) is not None else '-' for key, fmt in columns]
      for r in results]
  return '\n'.join('| ' + ' | '.join(row) + ' |' for row in rows)


def parse_flags(argv):
  """Flags in one line on failure."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    cli.fail(str(e).splitlines()[0])
  if len(rest) > 1:
    cli.fail(f'unexpected arguments: {" ".join(rest[1:])}')
  for flag in (_STEPS, _BATCH_SIZE):
    if flag.value < 1:
      cli.fail(f'--{flag.name}={flag.value} is not allowed: use an integer >= 1')
  if _WARMUP.value < 0:
    cli.fail(f'--warmup={_WARMUP.value} is not allowed: use an integer >= 0')
  if _PRECISION.value not in config_lib.PRECISIONS:
    cli.fail(f'--precision={_PRECISION.value} is not allowed: use one of '
             f'{", ".join(config_lib.PRECISIONS)}')
  return rest


def main(argv):
  del argv
  cli.configure_jax()
  try:
    names = select(_CASES.value)
  except mtvae_jax.UserError as e:
    cli.fail(str(e))
  if _TORCH.value:
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      cli.fail("--torch: PyTorch is not installed: pip install -e '.[bench]', or pass --notorch")
    torch.set_num_threads(os.cpu_count())
  # A fresh persistent cache, so that the first compile of each case is a cold one.
  jax.config.update('jax_compilation_cache_dir', tempfile.mkdtemp(prefix='mtvae_jax_bench_'))
  print(machine(torch.__version__ if _TORCH.value else None), flush=True)
  results = []
  for name in names:
    results.append(run_case(name, _STEPS.value, _WARMUP.value, _BATCH_SIZE.value,
                            _TORCH.value, _TORCH_COMPILE.value, _PRECISION.value))
    print(table(results[-1:]).splitlines()[-1], flush=True)
  print(table(results))
  if _OUT.value:
    pathlib.Path(_OUT.value).write_text(json.dumps(results, indent=2) + '\n')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
