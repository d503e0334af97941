"""Command line: python -m experiments.complete --workdir=<run> --input=FILE --output=OUT.npz.

Completes images from their observed pixels (mtvae_jax.completion.io): --input
is an .npz with arrays `values` and `mask`, or an image file with --mask=PNG
(its nonzero pixels are the observed ones). Writes OUT.npz (`mean`, `std`,
`samples`, `mask`) and OUT.png (per image: observed | mean | std | samples),
never over an input, and over existing files only with --overwrite. Shows its
progress on stderr. Mistakes end the program with one line and exit status 2
(experiments/cli.py), before the run is loaded where they do not depend on it.
"""
import functools
import sys

from absl import app
from absl import flags

from experiments import cli
from mtvae_jax import completion
from mtvae_jax.completion import io as completion_io

_INPUT = flags.DEFINE_string('input', None, '.npz with values and mask, or an image with --mask.')
_MASK = flags.DEFINE_string('mask', None, 'PNG of the observed pixels (nonzero), for an image input.')
_OUTPUT = flags.DEFINE_string('output', None, 'Output .npz; the panel goes beside it as .png.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 32, 'Completions per image.')
_METHOD = flags.DEFINE_enum('method', 'posterior', completion.METHODS,
                            'Latents from the posterior given the observed pixels, or the prior.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the completions.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False,
                               'Replace an existing --output .npz and its .png panel.')


def main(argv):
  del argv
  cli.configure_jax()
  for flag in (_INPUT, _OUTPUT):
    if not flag.value:
      cli.fail(f'--{flag.name} is required')
  written = cli.run(completion_io.complete_files, cli.WORKDIR.value, _INPUT.value, _MASK.value,
                    _OUTPUT.value, _NUM_SAMPLES.value, _METHOD.value, _SEED.value,
                    _OVERWRITE.value, functools.partial(print, file=sys.stderr, flush=True))
  print('wrote ' + ' and '.join(map(str, written)))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(
      'experiments.complete', config=cli.REFUSED, workdir=cli.FINISHED_RUN))
