"""Command line: python -m experiments.sparse_benchmark --workdir=<run> [--fractions=... | --counts=...].

Scores the run's posterior and prior completions and three baselines on the
hidden pixels of the first --num_images test images, for each observed
fraction and mask sampling (mtvae_jax.completion.benchmark), and writes
<workdir>/sparse_benchmark.json and <workdir>/figures/sparse_benchmark.png.
A VQ run needs its prior first (experiments.prior). Mistakes end the program
with one line and exit status 2 (experiments/cli.py).
"""
import time

from absl import app
from absl import flags

from experiments import cli
from mtvae_jax import completion
from mtvae_jax.completion import benchmark as sparse_benchmark
from mtvae_jax.errors import UserError

_FRACTIONS = flags.DEFINE_list(
    'fractions', [str(f) for f in sparse_benchmark.FRACTIONS],
    'Observed fractions of the pixels, e.g. 0.01,0.1.')
_COUNTS = flags.DEFINE_list(
    'counts', None, 'Observed pixels per image instead of --fractions, e.g. 8,16,49.')
_SAMPLINGS = flags.DEFINE_multi_enum(
    'samplings', list(sparse_benchmark.SAMPLINGS), ('uniform', 'exact', 'gaussian'),
    'Mask samplings.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 100, 'First test images scored.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 32, 'Samples per image of every method.')
_NEIGHBOURS = flags.DEFINE_integer('neighbours', 16, 'k of nearest_neighbours.')
_NUM_STEPS = flags.DEFINE_integer('num_steps', completion.Settings().num_steps,
                                  'MCMC steps of the posterior completion.')
_POSTERIOR_NEIGHBOURS = flags.DEFINE_integer(
    'posterior_neighbours', completion.Settings().neighbours,
    'Training images nearest on the observed pixels whose latents the posterior weighs; 0: '
    'draws from the model\'s own prior instead.')
_NUM_PROPOSALS = flags.DEFINE_integer(
    'num_proposals', completion.Settings().num_proposals,
    'Prior draws per image of a Gaussian run with --posterior_neighbours=0.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the masks and samples.')


def _numbers(flag, kind, allowed, what):
  """The values of the list flag `flag` as `kind`, each one `allowed` (a predicate): `what`."""
  try:
    values = [kind(value) for value in flag.value]
  except ValueError:
    values = None
  if not values or not all(map(allowed, values)):
    raise UserError(f'--{flag.name}={",".join(flag.value)} is not allowed: give a comma-separated '
                    f'list of {what}')
  return values


def run_benchmark(workdir):
  """Benchmarks the run in `workdir` with the flags' settings and writes its outputs. The flags
  are checked before the run is loaded, those that depend on its images before it is
  calibrated."""
  for flag, low in ((_NUM_SAMPLES, 2), (_NEIGHBOURS, 1), (_NUM_STEPS, 0), (_NUM_PROPOSALS, 1),
                    (_POSTERIOR_NEIGHBOURS, 0), (_NUM_IMAGES, 1)):
    if flag.value < low:
      raise UserError(f'--{flag.name}={flag.value} is not allowed: use an integer >= {low}')
  if _COUNTS.value is not None:
    counts = _numbers(_COUNTS, int, lambda count: True, 'pixel counts')
  else:
    fractions = _numbers(_FRACTIONS, float, lambda fraction: 0 < fraction < 1,
                         'fractions of the pixels, each between 0 and 1')
  start = time.perf_counter()
  run = completion.load_run(workdir)
  height, width, _ = run.splits.test.shape[1:]
  if _COUNTS.value is not None:
    if not all(1 <= count < height * width for count in counts):
      raise UserError(f'--counts={",".join(_COUNTS.value)} is not allowed: give pixel counts from '
                      f'1 to {height * width - 1} ({height}x{width} images)')
    fractions = [count / (height * width) for count in counts]
  sparse_benchmark.check_arguments(run, fractions, _NUM_IMAGES.value, _NUM_SAMPLES.value)
  calibrating = time.perf_counter()
  helper = completion.completer(workdir, run)
  print(f'completer ready (calibrated, or its cache read) in '
        f'{time.perf_counter() - calibrating:.0f} s', flush=True)
  settings = completion.Settings(num_proposals=_NUM_PROPOSALS.value, num_steps=_NUM_STEPS.value,
                                 neighbours=_POSTERIOR_NEIGHBOURS.value)
  result = sparse_benchmark.benchmark(
      helper, fractions, tuple(dict.fromkeys(_SAMPLINGS.value)), _NUM_IMAGES.value,
      _NUM_SAMPLES.value, _NEIGHBOURS.value, _SEED.value, settings)
  sparse_benchmark.write(workdir, result)
  print(sparse_benchmark.table(result))
  print(f'wrote {workdir}/{sparse_benchmark.RESULT_FILE} and {workdir}/'
        f'{sparse_benchmark.FIGURE_FILE} in {time.perf_counter() - start:.0f} s')


def main(argv):
  del argv
  cli.configure_jax()
  if flags.FLAGS['counts'].present and flags.FLAGS['fractions'].present:
    cli.fail('give --fractions or --counts, not both')
  cli.run(run_benchmark, cli.WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(
      'experiments.sparse_benchmark', config=cli.REFUSED, workdir=cli.FINISHED_RUN))
