"""Command line: python -m experiments.crossval --config=<config> --workdir=<dir> --folds=5.

Trains fold i of k into <dir>/fold_<i> (folds already finished are kept),
then writes <dir>/crossval.json and <dir>/crossval.md. Config overrides work
as for experiments.main; mistakes end with one line and exit status 2.
"""
from absl import app
from absl import flags
from absl import logging

from experiments import main as cli
from mtvae_jax import crossval

_FOLDS = flags.DEFINE_integer('folds', 5, 'Number of folds k >= 2.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  summary = cli.run(lambda config, workdir: crossval.cross_validate(config, workdir, _FOLDS.value))
  print(crossval.markdown_table([summary]), end='')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
