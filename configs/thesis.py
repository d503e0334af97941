"""The thesis's experiment grid (its 4.3), one named row per table row. Argument: the data set.

Each row trains one model: `model` ('gaussian' | 'vq'), network configuration
`preset`, `method` ('none' | 'multi' | 'single'), how the conditioning pixels
are drawn (`sampling`, `count` 'fixed' or 'power_law', power-law `exponent`)
and the loss `balancing` ('fixed' | 'softadapt'); fields a method does not
use are None. `python -m experiments.thesis --grid=configs/thesis.py:<data set>`
runs every row's folds.

- 'mnist', 'fashion_mnist', 'cifar10', 'celeb_a': the thesis's grid, 45 rows.
  Per model and configuration: the baseline; the multidecoder with exact and
  uniform sampling, each with fixed weights and with SoftAdapt; the single
  decoder with uniform and Gaussian sampling, each at power-law exponents 20
  and 60 (the ends of the thesis's range 20-60).
- 'digits': the smallest grid that tests every claim, 7 rows: per model,
  configuration 1's baseline, multidecoder (exact sampling) and single decoder
  (uniform sampling) at exponent 60, and the VQ-VAE's at exponent 20 too.
- 'fashion_mnist_cpu', 'mnist_cpu': configuration 1 of both models on a
  28 x 28 set, 18 rows, 3 folds, trained on an 8,000-image subset, the
  Gaussian VAE for 6 epochs and the VQ-VAE (about twice the cost per step)
  for 3: on Fashion-MNIST each row's test reconstruction ends at most a third
  of the mean image's error, in about 70 minutes on 2 CPU cores (README:
  Reproducing the thesis).

A grid may also set `folds` (the default of --folds), `overrides`
(--config.<key>=<value> flags for every row) and `model_overrides` ({model:
flags} for that model's rows, after `overrides`); those of the command line
come last.
"""
import ml_collections

from mtvae_jax import methods
from mtvae_jax.errors import UserError
from mtvae_jax.thesis import runs

PRESETS = {'gaussian': (1, 2), 'vq': (1, 2, 3)}
EXPONENTS = (20, 60)
FULL_GRID_DATA = ('mnist', 'fashion_mnist', 'cifar10', 'celeb_a')


def row(model, preset, method, sampling=None, exponent=None, balancing='fixed'):
  """(name, fields) of one row; a conditioned method counts its pixels as methods.METHODS says
  (multi a fixed number, single a power-law one)."""
  spec = methods.METHODS[method]
  count = spec.count if spec.conditioned else None
  words = [f'{runs.CONFIG_FILES[model]}{preset}', runs.METHOD_FILES[method]]
  words += [w for w in (sampling, exponent and f'a{exponent}') if w]
  words += ['softadapt'] if balancing == 'softadapt' else []
  return '_'.join(words), dict(model=model, preset=preset, method=method, sampling=sampling,
                               count=count, exponent=exponent, balancing=balancing)


def family(model, preset):
  """The thesis's nine rows of one model and configuration."""
  rows = [row(model, preset, 'none')]
  rows += [row(model, preset, 'multi', sampling, balancing=balancing)
           for balancing in ('fixed', 'softadapt') for sampling in ('exact', 'uniform')]
  rows += [row(model, preset, 'single', sampling, exponent)
           for sampling in ('uniform', 'gaussian') for exponent in EXPONENTS]
  return rows


def smallest(model, exponents):
  """Configuration 1's baseline, multidecoder and single decoders at `exponents`."""
  return [row(model, 1, 'none'), row(model, 1, 'multi', 'exact')] + [
      row(model, 1, 'single', 'uniform', exponent) for exponent in exponents]


def full_grid(data):
  return dict(data=data, rows=[r for model, presets in PRESETS.items() for preset in presets
                               for r in family(model, preset)])


def cpu_grid(data):
  """Configuration 1 of both models, trained long enough on 2 CPU cores for verdicts."""
  return dict(data=data, rows=family('gaussian', 1) + family('vq', 1), folds=3,
              overrides=('--config.data.max_images=8000', '--config.train.num_epochs=6',
                         '--config.train.batch_size=64'),
              model_overrides={'vq': ('--config.train.num_epochs=3',)})


# grid argument -> its data set, rows and (optionally) folds and overrides
GRIDS = {
    'digits': lambda: dict(data='digits', rows=smallest('gaussian', EXPONENTS[-1:])
                           + smallest('vq', EXPONENTS)),
    **{data: lambda data=data: full_grid(data) for data in FULL_GRID_DATA},
    **{f'{data}_cpu': lambda data=data: cpu_grid(data) for data in ('mnist', 'fashion_mnist')},
}


def get_config(arg='digits'):
  if arg not in GRIDS:
    raise UserError(f"grid argument '{arg}' is not allowed: use one of {', '.join(GRIDS)}")
  grid = GRIDS[arg]()
  config = ml_collections.ConfigDict()
  config.data = grid['data']
  config.rows = ml_collections.ConfigDict(dict(grid['rows']))
  config.folds = grid.get('folds', 5)
  config.overrides = tuple(grid.get('overrides', ()))
  config.model_overrides = {model: tuple(flags)
                            for model, flags in grid.get('model_overrides', {}).items()}
  return config
