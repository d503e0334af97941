"""Command line: python -m experiments.evaluate --workdir=<a trained run> [--baseline=<run>].

Writes the run's sparse-reconstruction curve (curve.json), uncertainty from
sparse observations (uncertainty.json) and figures/*.png into --workdir; see
mtvae_jax/evaluation.py. Mistakes end with one line and exit status 2
(experiments/cli.py).
"""
from absl import app
from absl import flags

from experiments import cli
from mtvae_jax import config as config_lib
from mtvae_jax import evaluation
from mtvae_jax import loop

_BASELINE = flags.DEFINE_string(
    'baseline', None, 'A finished run of the same model and data to compare with (method none).')
_NUM_SAMPLES = flags.DEFINE_integer(
    'num_samples', 32, 'Prior samples per test image for the uncertainty analysis.')


def main(argv):
  del argv
  cli.configure_jax()
  results = cli.run(evaluation.evaluate_run, cli.WORKDIR.value, _BASELINE.value,
                    _NUM_SAMPLES.value)
  for name, result in results.items():
    print(f'{name}: {loop.format_metrics(config_lib.flatten(result))}')
  print(f'wrote {cli.WORKDIR.value}/{evaluation.FIGURES_DIR}/')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(
      'experiments.evaluate', config=cli.REFUSED, workdir=cli.FINISHED_RUN))
