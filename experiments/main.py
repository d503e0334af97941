"""Command line: python -m experiments.main --config=configs/gauss_multi.py[:<arg>] --workdir=<dir>.

Trains a VAE (mtvae_jax.train_and_evaluate). Any config key can be overridden,
e.g. --config.train.num_epochs=5. Mistakes in flags, config or data end the
program with one line and exit status 2 (experiments/cli.py).
"""
from absl import app

from experiments import cli
import mtvae_jax


def main(argv):
  del argv
  cli.configure_jax()
  cli.run(mtvae_jax.train_and_evaluate, cli.CONFIG.value, cli.workdir())


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('experiments.main'))
