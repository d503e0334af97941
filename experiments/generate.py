"""Command line: python -m experiments.generate --workdir=<run> --num=N [--pixels=K --sampling=...].

Writes PNG grids of samples (and, for multi and single runs, of completions of
one test image from K given pixels) to <workdir>/samples/. A VQ run needs its
prior first (experiments.prior). Mistakes end the program with one line and
exit status 2 (experiments/cli.py).
"""
from absl import app
from absl import flags

from experiments import cli
from mtvae_jax import generate
from mtvae_jax import masks

_NUM = flags.DEFINE_integer('num', 16, 'Number of samples, and of completions.')
_PIXELS = flags.DEFINE_integer(
    'pixels', None, "Given pixels of the completed test image; default the run's mask.num_pixels.")
_SAMPLING = flags.DEFINE_string(
    'sampling', None, f"Mask sampler of the given pixels: {', '.join(masks.SAMPLINGS)}; default "
    "the run's mask.sampling.")
_TEMPERATURE = flags.DEFINE_float(
    'temperature', 1.0, 'Prior temperature: divides the PixelCNN logits, scales the std of z.')
_IMAGE = flags.DEFINE_integer('image', 0, 'Index of the completed image in the test split.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the samples and of the mask.')


def main(argv):
  del argv
  cli.configure_jax()
  cli.run(generate.generate, cli.WORKDIR.value, _NUM.value, pixels=_PIXELS.value,
          sampling=_SAMPLING.value, temperature=_TEMPERATURE.value, image=_IMAGE.value,
          seed=_SEED.value)
  print(f'wrote {cli.WORKDIR.value}/{generate.SAMPLES_DIR}/')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(
      'experiments.generate', config=cli.REFUSED, workdir=cli.FINISHED_RUN))
