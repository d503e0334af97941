"""Command line: python -m experiments.crossval --config=<config> --workdir=<dir> --folds=5.

Trains fold i of k into <dir>/fold_<i> (folds already finished are kept),
then writes <dir>/crossval.json and <dir>/crossval.md. Config overrides work
as for experiments.main; mistakes end with one line and exit status 2
(experiments/cli.py).
"""
from absl import app
from absl import flags

from experiments import cli
from mtvae_jax.thesis import crossval

_FOLDS = flags.DEFINE_integer('folds', 5, 'Number of folds k >= 2.')


def main(argv):
  del argv
  cli.configure_jax()
  summary = cli.run(crossval.cross_validate, cli.CONFIG.value, cli.workdir(), _FOLDS.value)
  print(crossval.markdown_table([summary]), end='')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('experiments.crossval'))
