"""Command line: python -m experiments.prior --workdir=<a finished VQ-VAE run> [--config=...].

Trains the gated PixelCNN prior over the run's codes into <workdir>/prior/;
rerun on an unfinished prior/, it resumes. --config defaults to
configs/prior.py; its keys can be overridden like the VAE's, e.g.
--config.train.num_epochs=5. Mistakes end the program with one line and exit
status 2 (experiments/cli.py).
"""
import pathlib

from absl import app

from experiments import cli
from mtvae_jax import prior

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'prior.py'


def main(argv):
  del argv
  cli.configure_jax()
  cli.run(prior.train_prior, cli.CONFIG.value, cli.WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(
      'experiments.prior', config=DEFAULT_CONFIG, validate=prior.validate,
      workdir='the folder of a finished VQ-VAE run of experiments.main'))
