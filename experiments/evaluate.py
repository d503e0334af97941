"""Command line: python -m experiments.evaluate --workdir=<a trained run> [--baseline=<run>].

Writes the run's sparse-reconstruction curve (curve.json), uncertainty from
sparse observations (uncertainty.json) and figures/*.png into --workdir; see
mtvae_jax/evaluation.py. Mistakes end with one line and exit status 2.
"""
import functools

from absl import app
from absl import flags
from absl import logging

from experiments import main as cli  # fail(), and the --workdir flag
import mtvae_jax
from mtvae_jax import evaluation

_BASELINE = flags.DEFINE_string(
    'baseline', None, 'A finished run of the same model and data to compare with (method none).')
_NUM_SAMPLES = flags.DEFINE_integer(
    'num_samples', 32, 'Prior samples per test image for the uncertainty analysis.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  workdir = flags.FLAGS.workdir
  try:
    results = evaluation.evaluate_run(workdir, _BASELINE.value, _NUM_SAMPLES.value)
  except mtvae_jax.UserError as e:
    cli.fail(str(e))
  for name, result in results.items():
    print(f'{name}: {result}')
  print(f'wrote {workdir}/figures/')


if __name__ == '__main__':
  app.run(main, flags_parser=functools.partial(cli.parse_workdir_flags, program='experiments.evaluate'))
