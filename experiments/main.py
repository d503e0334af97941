"""Command line: python -m experiments.main --config=configs/gauss_multi.py[:<arg>] --workdir=<dir>.

Any config key can be overridden, e.g. --config.train.num_epochs=5. Mistakes
in flags, config or data end the program with one line and exit status 2.
"""
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

import mtvae_jax

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, with an optional argument: configs/<name>.py:<data set>,<n>.')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output directory; default runs/<model>_<method>_<data set>.')


def fail(message):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _flag_error_message(error, argv):
  """One line for a flag-parsing failure: bad config file, argument, key or value."""
  chain, cause = [], error
  while cause is not None:
    chain.append(cause)
    cause = cause.__cause__ or cause.__context__
  for cause in chain:  # a UserError from get_config, which config_flags wraps as text
    if isinstance(cause, mtvae_jax.UserError) or 'UserError: ' in str(cause):
      return str(cause).strip().splitlines()[-1].split('UserError: ')[-1]
  if isinstance(error, (AttributeError, KeyError)):
    missing = str(error).strip('"\'')
    bad = [a.split('=')[0][2:] for a in argv
           if a.startswith('--config.') and missing in a.split('=')[0].split('.')]
    return f"config key {', '.join(bad) or missing} does not exist (see the config file for the keys)"
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if isinstance(error, OSError):
    return f'cannot load the config file: {lines[-1]}'
  return lines[0] if lines else type(error).__name__


def parse_flags(argv):
  """absl's flag parsing, with each failure reported in one line."""
  try:
    rest = flags.FLAGS(argv)
    if not flags.FLAGS['config'].present:
      fail('--config is required, e.g. --config=configs/gauss_multi.py')
    _CONFIG.value.model  # pylint: disable=pointless-statement  # a bad file fails here
  except (flags.Error, AttributeError, KeyError, OSError, ValueError) as e:
    fail(_flag_error_message(e, argv))
  if len(rest) > 1:
    fail(f'unexpected arguments: {" ".join(rest[1:])}')
  return rest


def parse_workdir_flags(argv, program):
  """Flag parsing for the commands that act on a finished run: --workdir required, no --config."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    fail(_flag_error_message(e, argv))
  if flags.FLAGS['config'].present:
    fail(f"--config is not a flag of {program}: the run's own config.json is used")
  if not flags.FLAGS.workdir:
    fail('--workdir is required: the folder of a finished run of experiments.main')
  if len(rest) > 1:
    fail(f'unexpected arguments: {" ".join(rest[1:])}')
  return rest


def run(run_fn):
  """Runs run_fn(config, workdir); a UserError ends the program with its one line."""
  config = _CONFIG.value
  workdir = _WORKDIR.value or f'runs/{config.model}_{config.method}_{config.data.name}'
  try:
    return run_fn(config, workdir)
  except mtvae_jax.UserError as e:
    fail(str(e))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep orbax's per-save lines off the terminal
  if not jax.config.jax_compilation_cache_dir:  # JAX_COMPILATION_CACHE_DIR, where set, wins
    # Compiled steps persist here: a second run of a config skips compilation.
    jax.config.update('jax_compilation_cache_dir', str(pathlib.Path.home() / '.cache/mtvae_jax/jax'))
  run(mtvae_jax.train_and_evaluate)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
