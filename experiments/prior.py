"""Command line: python -m experiments.prior --workdir=<a finished VQ-VAE run> [--config=...].

Trains the gated PixelCNN prior over the run's codes into <workdir>/prior/.
--config defaults to configs/prior.py; its keys can be overridden like the
VAE's, e.g. --config.train.num_epochs=5. The flags --config and --workdir and
the one-line errors (exit status 2) are experiments.main's.
"""
import pathlib

from absl import app
from absl import flags
from absl import logging

from experiments import main as cli
from mtvae_jax import prior

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'prior.py'


def parse_flags(argv):
  """Flag parsing with --config defaulting to configs/prior.py and --workdir required."""
  if not any(arg == '--config' or arg.startswith('--config=') for arg in argv[1:]):
    argv = [argv[0], f'--config={DEFAULT_CONFIG}', *argv[1:]]
  try:
    rest = flags.FLAGS(argv)
    prior.validate(flags.FLAGS.config)  # a bad file fails here
  except (flags.Error, AttributeError, KeyError, OSError, ValueError) as e:
    cli.fail(cli._flag_error_message(e, argv))  # pylint: disable=protected-access
  if not flags.FLAGS.workdir:
    cli.fail('--workdir is required: the folder of a finished VQ-VAE run of experiments.main')
  if len(rest) > 1:
    cli.fail(f'unexpected arguments: {" ".join(rest[1:])}')
  return rest


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep orbax's per-save lines off the terminal
  cli.run(prior.train_prior)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
