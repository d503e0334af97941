"""Shared fixtures: small networks on the embedded digits so every test compiles little."""
import collections
import contextlib
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile

import jax
import pytest

from experiments import cli
from mtvae_jax import config as config_lib
from mtvae_jax.data import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_IMAGES = 1455  # digits
STEPS_PER_EPOCH = 22  # 1455 digits training images in batches of 64
DIGITS_SHAPE = (8, 8, 1)

VARIANTS = [(model, method) for model in ('gaussian', 'vq') for method in ('none', 'multi', 'single')]


def small_config(model, method, num_epochs=2):
  """A thesis config with narrow layers, for tests: same code paths, little compute; resolved for
  the digits' 8x8 images (mask.num_pixels=16)."""
  config = config_lib.resolve_for_images(config_lib.base_config(model, method, 'digits'),
                                         DIGITS_SHAPE)
  config.gaussian.hidden_sizes = (8, 16)
  config.gaussian.latent_dim = 4
  config.vq.hidden_sizes = (8, 16)
  config.vq.num_residual_layers = 1
  config.vq.num_embeddings = 16
  config.vq.embedding_dim = 4
  config.train.num_epochs = num_epochs
  config.train.batch_size = 64
  return config


@pytest.fixture
def make_config():
  return small_config


def small(make_config, **train_keys):
  """A 2-epoch multidecoder Gaussian config that checkpoints every 5 of its 22 steps per epoch."""
  config = make_config('gaussian', 'multi', num_epochs=2)
  config.train.update(checkpoint_every_steps=5, **train_keys)
  return config


@pytest.fixture
def sigterm_after(monkeypatch):
  """Makes a training loop receive SIGTERM after `n` training batches (monkeypatch.undo() ends it)."""
  def arm(n):
    feed = pipeline.batches
    def batches(images, *args, **kwargs):
      for batch in feed(images, *args, **kwargs):
        # the training split held on the device by the loop, not evaluation or encoding
        if isinstance(images, jax.Array) and len(images) == TRAIN_IMAGES:
          if sigterm_after.count == n:
            os.kill(os.getpid(), signal.SIGTERM)
          sigterm_after.count += 1
        yield batch
    sigterm_after.count = 0
    monkeypatch.setattr(pipeline, 'batches', batches)
  return arm


def latest_steps(workdir):
  """The steps of workdir's latest checkpoints, ascending."""
  folder = pathlib.Path(workdir) / 'checkpoints' / 'latest'
  return sorted(int(p.name) for p in folder.glob('*') if p.name.isdigit()) if folder.is_dir() else []


@contextlib.contextmanager
def compilations():
  """Counts what jit compiles inside the block, by the names jax logs: yields (compiled, cached),
  Counters of 'jit(<function>)' traced and compiled or loaded, and of 'jit_<function>' loaded
  from the persistent compilation cache."""
  compiled, cached = collections.Counter(), collections.Counter()

  class Handler(logging.Handler):

    def emit(self, record):
      message = record.getMessage()
      if message.startswith('Compiling '):
        compiled[message.split()[1]] += 1
      elif message.startswith('Persistent compilation cache hit for '):
        cached[message.split("'")[1]] += 1

  handler = Handler()
  logging.getLogger('jax').addHandler(handler)
  try:
    with jax.log_compiles(True):
      yield compiled, cached
  finally:
    logging.getLogger('jax').removeHandler(handler)


# The completion's calibration in tests: the same code on fewer validation images.
QUICK_CALIBRATION = {'CALIBRATION_IMAGES': 16, 'NOISE_IMAGES': 128}


@contextlib.contextmanager
def quick_calibration():
  """Completers made inside the block calibrate as QUICK_CALIBRATION says."""
  from mtvae_jax.completion import calibration  # pylint: disable=import-outside-toplevel
  with pytest.MonkeyPatch.context() as patch:
    for name, value in QUICK_CALIBRATION.items():
      patch.setattr(calibration, name, value)
    yield


def run_quickly_calibrated(module, *args):
  """python -m <module> <args> as a user runs it, calibrating as QUICK_CALIBRATION says (so it
  reuses the completion cache of a run calibrated under quick_calibration)."""
  code = ('import runpy; from mtvae_jax.completion import calibration; '
          f'vars(calibration).update({QUICK_CALIBRATION!r}); '
          f'runpy.run_module({module!r}, run_name="__main__", alter_sys=True)')
  return subprocess.run([sys.executable, '-c', code, *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, env=device_env())


def run_main(*args, devices=None):
  """python -m experiments.main with `args`, from the repository root, as a user runs it;
  with `devices`, on that many CPU devices."""
  return subprocess.run([sys.executable, '-m', 'experiments.main', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, env=device_env(devices))


def device_env(devices=None):
  """The environment of a subprocess that imports the project (and tests/), with `devices`
  CPU devices when given."""
  env = dict(os.environ, PYTHONPATH=f'{ROOT}{os.pathsep}{ROOT / "tests"}')
  if devices:
    flag = f'--xla_force_host_platform_device_count={devices}'
    env['XLA_FLAGS'] = f'{env.get("XLA_FLAGS", "")} {flag}'.strip()
  return env


# The suite compiles hundreds of small programs and runs each on a few images, so compiling is
# most of its time. XLA's backend optimisation level 1 compiles them about 2.5x faster than the
# default (the two models' loss gradients: 20 s against 51 s) and runs them as fast; level 0
# compiles a little faster still but runs the completion's calibration 2.6x slower. XLA:CPU's
# older loop emitters for fused elementwise work take a further 20-30 % off each compilation
# (test_completion.py: 93 s of backend compilation against 132 s). Workers and subprocesses
# inherit the flags, so the numbers a test compares come from programs compiled alike.
FAST_COMPILE_FLAGS = ('--xla_backend_optimization_level=1', '--xla_cpu_use_fusion_emitters=false')


def pytest_configure(config):
  """The command lines' JAX setup with FAST_COMPILE_FLAGS, and one persistent compilation cache
  for the whole session, its workers and subprocesses.

  With the setup of experiments.cli (XLA_FLAGS among it), a run in a test
  computes the same numbers as the same run from a command line with the
  suite's environment. Many tests compile the same small programs; each
  compiles once per session. The controller makes the folder before xdist
  starts its workers, which inherit the environment; it is removed at the end.
  A JAX_COMPILATION_CACHE_DIR set by the user is kept (and not removed).
  """
  if hasattr(config, 'workerinput'):
    return
  given = os.environ.get('XLA_FLAGS', '')
  missing = [flag for flag in FAST_COMPILE_FLAGS if flag.split('=')[0] not in given]
  os.environ['XLA_FLAGS'] = ' '.join([given, *missing]).strip()
  cli.configure_jax()
  if 'JAX_COMPILATION_CACHE_DIR' in os.environ:
    return
  config.jax_cache_dir = tempfile.mkdtemp(prefix='mtvae_jax_test_compile_cache_')
  os.environ.update(JAX_COMPILATION_CACHE_DIR=config.jax_cache_dir,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  # jax read the environment when this file imported it; without xdist, this process runs tests.
  jax.config.update('jax_compilation_cache_dir', config.jax_cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


# The files that take longest (their module fixtures train runs), longest first. xdist hands
# whole files to the workers in collection order: with these first, the last files to run are
# short ones and the workers end together, where a long file started last would run alone.
LONGEST_FILES = ('test_completion.py', 'test_parallel.py', 'test_thesis.py',
                 'test_workdir_damage.py', 'test_hardening.py', 'test_train.py',
                 'test_balancing.py', 'test_resume.py', 'test_generate.py', 'test_evaluation.py')


def pytest_collection_modifyitems(items):
  """Runs LONGEST_FILES first, in that order; the other files follow as collected."""
  rank = {name: index for index, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_unconfigure(config):
  if getattr(config, 'jax_cache_dir', None):
    shutil.rmtree(config.jax_cache_dir, ignore_errors=True)
