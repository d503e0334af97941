"""What the experiments.* command lines share: --config and --workdir, one-line errors, JAX setup.

A mistake in a flag, a config file or value, the data or a work directory
ends the program with one line `error: ...` on stderr and exit status 2: the
library raises mtvae_jax.UserError, and `run` or the flags parser prints it.
Each entry point calls `configure_jax` first thing in its main function.
"""
import importlib.metadata
import os
import pathlib
import sys

from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

import mtvae_jax
from mtvae_jax import config as config_lib

CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, with an optional argument: configs/<name>.py:<data set>,<n>.')
WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output directory; default runs/<model>_<method>_<data set>.')
# What the flags parser does with --config: demand it, refuse it, or default to a file.
REQUIRED, REFUSED = 'required', 'refused'
# What --workdir names for the commands that act on a trained run.
FINISHED_RUN = 'the folder of a finished run of experiments.main'
# Compiled programs persist here unless JAX_COMPILATION_CACHE_DIR names another folder.
COMPILATION_CACHE = pathlib.Path.home() / '.cache' / 'mtvae_jax' / 'jax'
# XLA:CPU runs convolutions with Eigen rather than YNNPACK: the models' train steps are faster
# that way on CPUs (BENCHMARKS.md) and compute the same numbers to float32 rounding. jaxlib
# releases before 0.10 abort on the flag.
CPU_CONVOLUTION_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'


def configure_jax():
  """The one place where the command lines set up JAX; each calls it before its first computation.

  Keeps orbax's per-checkpoint log lines off the terminal, and keeps compiled
  programs in a persistent cache (COMPILATION_CACHE, where
  JAX_COMPILATION_CACHE_DIR is unset), so a second run of a config starts
  without compiling its steps. Adds CPU_CONVOLUTION_FLAG to XLA_FLAGS, which
  XLA reads when the first computation starts its backend, unless XLA_FLAGS
  names that option already (the user's choice).
  """
  logging.set_verbosity(logging.WARNING)
  xla_flags = os.environ.get('XLA_FLAGS', '')
  jaxlib = tuple(int(part) for part in importlib.metadata.version('jaxlib').split('.')[:2])
  if CPU_CONVOLUTION_FLAG.split('=')[0] not in xla_flags and jaxlib >= (0, 10):
    os.environ['XLA_FLAGS'] = f'{xla_flags} {CPU_CONVOLUTION_FLAG}'.strip()
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', str(COMPILATION_CACHE))


def fail(message, status=2):
  """Ends the program with `message` on one line and exit status `status` (2: a mistake)."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(status)


def _chain(error):
  while error is not None:
    yield error
    error = error.__cause__ or error.__context__


def error_line(error, argv):
  """One line for a flag-parsing failure: bad config file, argument, key or value."""
  user_errors = [e for e in _chain(error) if isinstance(e, mtvae_jax.UserError)]
  if user_errors:  # the innermost is the config file's own; config_flags re-raises it with a traceback
    return str(user_errors[-1])
  if isinstance(error, (AttributeError, KeyError)):
    # ml_collections' KeyError (in an AttributeError) holds the key and, on a second line, a
    # suggestion
    error = next((e for e in _chain(error) if isinstance(e, KeyError)), error)
    missing, *hint = str(error.args[0] if error.args else error).splitlines()
    missing = missing.strip('"\' ')
    bad = [a.split('=')[0][2:] for a in argv
           if a.startswith('--config.') and missing in a.split('=')[0].split('.')]
    return (f"config key {', '.join(bad) or missing} does not exist"
            f"{': ' + hint[0].strip() if hint else ''} (--help lists the keys)")
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if isinstance(error, OSError):
    return f'cannot load the config file: {lines[-1]}'
  return lines[0] if lines else type(error).__name__


def flags_parser(program, *, config=REQUIRED, validate=None, workdir=None, usage=None):
  """An absl `flags_parser` for `program` that reports every mistake in one line.

  config: REQUIRED, REFUSED, or the config file used when --config is absent.
  validate: None, or config -> None raising UserError, run on the loaded config.
  workdir: None (--workdir optional), or what --workdir must name (then required).
  usage: None (no positional arguments), or the one-line usage of a program
  that takes one or more.
  """
  def parse(argv):
    if any(arg in ('-h', '--help', '--helpshort', '--helpfull') for arg in argv[1:]):
      print_help()
      sys.exit(0)
    if config not in (REQUIRED, REFUSED) and not any(
        arg == '--config' or arg.startswith('--config=') for arg in argv[1:]):
      argv = [argv[0], f'--config={config}', *argv[1:]]
    try:
      rest = flags.FLAGS(argv)
      if config == REFUSED and flags.FLAGS['config'].present:
        fail(f'--config is not a flag of {program}')
      if config == REQUIRED and not flags.FLAGS['config'].present:
        fail('--config is required, e.g. --config=configs/gauss_multi.py')
      if config != REFUSED:
        loaded = CONFIG.value
        if loaded is not None and not isinstance(loaded, dict):
          loaded.keys()  # config_flags' stand-in for a config file that failed to load raises here
        if not isinstance(loaded, ml_collections.ConfigDict):
          fail(f'the config file --config={flags.FLAGS["config"].config_filename} made a '
               f'{type(loaded).__name__}, not a ConfigDict: its get_config() must return '
               'mtvae_jax.config.base_config(...)')
        if validate:
          validate(loaded)
    except (flags.Error, AttributeError, KeyError, OSError, ValueError) as e:
      fail(error_line(e, argv))
    except Exception as e:  # pylint: disable=broad-except  # the config file's own code failed
      fail(f'the config file failed to load: {type(e).__name__}: {e}')
    if workdir and not WORKDIR.value:
      fail(f'--workdir is required: {workdir}')
    if usage and len(rest) < 2:
      fail(usage)
    if not usage and len(rest) > 1:
      fail(f'unexpected arguments: {" ".join(rest[1:])}')
    return rest

  def print_help():
    print((sys.modules['__main__'].__doc__ or f'python -m {program}').strip() + '\n')
    print(flags.FLAGS.main_module_help() or '')
    print('\n'.join(f'  --{name}: {flags.FLAGS[name].help}' for name in ('config', 'workdir')
                    if name in flags.FLAGS and (name != 'config' or config != REFUSED)))
    if config != REFUSED:
      print('\nconfig keys, set with --config.<key>=<value> (defaults of a gaussian multi run):')
      for key, value in config_lib.flatten(config_lib.base_config('gaussian', 'multi')).items():
        print(f'  {key}={value!r}')

  return parse


def workdir():
  """--workdir, by default runs/<model>_<method>_<data set> of --config."""
  config = CONFIG.value
  return WORKDIR.value or f'runs/{config.model}_{config.method}_{config.data.name}'


def run(fn, *args, **kwargs):
  """fn(*args, **kwargs); a UserError ends the program with its one line."""
  try:
    return fn(*args, **kwargs)
  except mtvae_jax.UserError as e:
    fail(str(e))
