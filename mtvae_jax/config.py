"""Default configs, dotted config keys, and up-front validation by rules.

Every file in configs/ is `get_config(arg)` over `base_config`; `arg` is a
comma-separated list whose words name the data set and/or the thesis's
network configuration by number, e.g. 'digits', 'idx,2', '3'.

A rule is a pair (ok(value) -> bool, what is allowed); `check` applies a
table {dotted key: rule} and names the first key whose value breaks its rule.
"""
import functools
import math
import numbers
import operator

import ml_collections

from mtvae_jax import balancing
from mtvae_jax import data
from mtvae_jax import families
from mtvae_jax import masks
from mtvae_jax import methods
from mtvae_jax.errors import UserError

# The thesis's network configurations (its 3.4.2).
PRESETS = {
    'gaussian': {
        1: dict(latent_dim=16, hidden_sizes=(32, 64, 128, 256)),
        2: dict(latent_dim=64, hidden_sizes=(32, 64, 128, 256)),
    },
    'vq': {
        1: dict(num_embeddings=128, embedding_dim=16, hidden_sizes=(32, 64), num_residual_layers=0),
        2: dict(num_embeddings=128, embedding_dim=32, hidden_sizes=(128, 256), num_residual_layers=2),
        3: dict(num_embeddings=256, embedding_dim=64, hidden_sizes=(128, 256), num_residual_layers=4),
    },
}
# mask.num_pixels that stands for a grid of the loaded images' size (grid_num_pixels).
GRID_NUM_PIXELS = -1
# What a non-finite loss does: stop training, or leave the batch out and count it.
NONFINITE_ACTIONS = ('stop', 'skip')
# train.precision: the dtype the layers' convolutions and matrix products compute in; parameters,
# optimizer state and losses stay float32.
PRECISIONS = ('float32', 'bfloat16')
# The smallest mask.gaussian_std: there the masks are already the few centre pixels, and far
# below it their weights underflow to zero.
MIN_GAUSSIAN_STD = 0.01


def config_argument(model, arg):
  """(configuration number, data set name) from a config file's argument, e.g. 'digits,2'."""
  words = [w for w in (arg or '').split(',') if w]
  presets = [int(w) for w in words if w.isdigit()]
  names = [w for w in words if not w.isdigit()]
  if len(presets) > 1 or len(names) > 1:
    raise UserError(f"config argument '{arg}' is not allowed: give at most one data set name and "
                    'one configuration number, e.g. digits,2')
  preset = presets[0] if presets else 1
  if preset not in PRESETS[model]:
    raise UserError(f'config argument: configuration {preset} is not allowed for model={model}: '
                    f'use one of {", ".join(map(str, PRESETS[model]))}')
  return preset, names[0] if names else 'digits'


def base_config(model, method, arg=None):
  """The config of `model` ('gaussian' | 'vq') trained by `method` ('none' | 'multi' | 'single')."""
  preset, dataset = config_argument(model, arg)
  config = ml_collections.ConfigDict()
  config.model = model
  config.method = method
  # How the conditioned decoder takes in m: 'dense' (the thesis's layer) or 'spatial'.
  config.conditioning = 'dense'
  config.preset = preset
  config.seed = 0

  config.data = ml_collections.ConfigDict(dict(
      name=dataset, path='', validation_fraction=0.1, test_fraction=0.1, num_folds=0, fold=0,
      tfds_data_dir='', crop_size=0, image_size=0, num_workers=2, cache_dir='',
      # At most this many images of the data set, drawn by seed before the splits (0: all).
      max_images=0))

  # The model's network is its configuration `preset`; the other family's is its configuration 1.
  for family, presets in PRESETS.items():
    config[family] = ml_collections.ConfigDict(dict(presets[preset if family == model else 1]))
  config.vq.commitment_cost = 0.25

  config.mask = ml_collections.ConfigDict(dict(
      sampling=methods.METHODS[method].sampling,
      count=methods.METHODS[method].count,
      # The fixed count k; -1: one pixel per stride-2 block on images under 16 pixels a side,
      # else per stride-4 block (16 on 8x8, 49 on 28x28, 64 on 32x32, 256 on 64x64 images),
      # resolved when the data are loaded (resolve_for_images).
      num_pixels=GRID_NUM_PIXELS,
      power_law_exponent=40.0,
      gaussian_std=0.25,
      # count='log_uniform': up to this fraction of the pixels. sampling / count = 'mixture':
      # one sampler / count per image, drawn in proportion to these weights.
      max_fraction=0.5,
      mixture=dict(sampling_weights=dict(exact=1.0, uniform=1.0, gaussian=1.0),
                   count_weights=dict(fixed=1.0, power_law=1.0, log_uniform=2.0))))

  # Loss weights: W1 (decoder 1), W2 (conditioned decoder), beta (KL) or the VQ term's weight.
  # balancing='softadapt' replaces the weights of softadapt.terms (() = all) during training.
  config.loss = ml_collections.ConfigDict(dict(
      weights=dict(recon=1.0, recon_cond=1.0, kl=1e-3, vq=1.0),
      balancing='fixed',
      softadapt=dict(variant='normalized', scale='coefficients', terms=(), beta=1.0,
                     update_every=10, window=10, total=1.0)))

  config.train = train_config(precision='float32')

  # Several hosts (mtvae_jax.parallel): unset values ('', 0, -1) come from the environment
  # variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or the cluster.
  # Where a run executes, not what it trains: left out when a workdir's run is compared.
  config.distributed = ml_collections.ConfigDict(dict(
      coordinator_address='', num_processes=0, process_id=-1))
  return config


def train_config(**changes):
  """The `train` section of the VAE's and the prior's configs: AdamW, epochs and checkpoints.

  The latest state is checkpointed every checkpoint_every_steps steps (0: at
  epoch ends only), at each epoch end and on SIGTERM/SIGINT; rerunning the
  same command resumes. on_nonfinite: what a non-finite loss does.
  """
  return ml_collections.ConfigDict(dict(dict(
      num_epochs=100, batch_size=128, learning_rate=1e-3, weight_decay=1e-4,
      checkpoint_every_steps=500, keep_checkpoints=3, on_nonfinite='stop'), **changes))


def lookup(config, key):
  """The value (or section) at dotted `key` of a ConfigDict or nested dict, e.g. 'train.seed'."""
  return functools.reduce(operator.getitem, key.split('.'), config)


def flatten(config, prefix=''):
  """{dotted key: value} of every leaf of a ConfigDict or nested dict."""
  if not isinstance(config, (dict, ml_collections.ConfigDict)):
    return {prefix[:-1]: config}
  return {k: v for key, sub in config.items() for k, v in flatten(sub, f'{prefix}{key}.').items()}


def check(config, rules):
  """Raises UserError naming the first key of `rules` {dotted key: (ok, allowed)} whose value
  breaks its rule."""
  for key, (ok, allowed) in rules.items():
    value = lookup(config, key)
    if isinstance(value, ml_collections.ConfigDict):
      value = value.to_dict()
    try:
      good = ok(value)
    except (TypeError, ValueError):  # a value of another type: a string, a tuple of strings...
      good = False
    if not good:
      raise UserError(f'config.{key}={value!r} is not allowed: {allowed}')


def one_of(choices):
  """The rule: a value among `choices`."""
  choices = tuple(choices)
  return (lambda value: value in choices), 'use one of ' + ', '.join(choices)


def is_integer(value):
  """Whether `value` is an integer (not a bool)."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def at_least(low, allowed, integer=True):
  """The rule: an integer (or with integer=False, a finite number) >= `low`; `allowed` says so
  to the user."""
  return (lambda value: (is_integer(value) if integer else math.isfinite(value))
          and value >= low), allowed


COUNT = at_least(1, 'use an integer >= 1')
NATURAL = at_least(0, 'use an integer >= 0')
NON_NEGATIVE = at_least(0, 'use a finite number >= 0', integer=False)
POSITIVE = (lambda value: 0 < value < math.inf), 'use a finite number > 0'
FINITE = (lambda value: math.isfinite(value)), 'use a finite number'
SEED = (lambda value: is_integer(value) and 0 <= value < 2**32), 'use an integer from 0 to 2**32 - 1'
FRACTION = (lambda value: 0 < value < 1), 'use a value in (0, 1)'
NUM_PIXELS_ALLOWED = 'use a count from 0 to {count}, or -1 for a grid of the image size'


def batch_fits(num_train):
  """The rule of train.batch_size for `num_train` training examples."""
  return (lambda value: value <= num_train), f'use at most {num_train}, the training images'


TRAIN_RULES = {
    'train.num_epochs': COUNT,
    'train.batch_size': COUNT,
    'train.learning_rate': POSITIVE,
    'train.on_nonfinite': one_of(NONFINITE_ACTIONS),
    'train.checkpoint_every_steps': at_least(0, 'use an integer >= 0 (0: at epoch ends only)'),
    'train.keep_checkpoints': COUNT,
    'train.weight_decay': NON_NEGATIVE,
}
HIDDEN_SIZES = ((lambda sizes: isinstance(sizes, (tuple, list)) and len(sizes) >= 1
                 and all(is_integer(size) and size >= 1 for size in sizes)),
                'use a tuple of one or more positive integer channel counts, e.g. (32,64)')
FAMILY_RULES = {  # the keys of config.gaussian and config.vq
    'gaussian': {'hidden_sizes': HIDDEN_SIZES, 'latent_dim': COUNT},
    'vq': {'hidden_sizes': HIDDEN_SIZES, 'num_embeddings': COUNT, 'embedding_dim': COUNT,
           'num_residual_layers': NATURAL, 'commitment_cost': NON_NEGATIVE},
}


def _mixture_weights(names):
  return ((lambda weights: set(weights) == set(names) and min(weights.values()) >= 0
           and sum(weights.values()) > 0),
          f'give a weight >= 0 to each of {", ".join(names)}, not all 0')


def validate(config):
  """Checks every key that does not depend on the data; raises UserError on the first bad one."""
  check(config, {'model': one_of(families.FAMILIES), 'method': one_of(methods.METHODS)})
  names = balancing.term_names(config.model, config.method)
  num_processes = config.distributed.num_processes
  check(config, {
      'seed': SEED,
      'conditioning': one_of(families.CONDITIONINGS),
      'data.name': one_of(data.DATASETS),
      'mask.sampling': one_of((*masks.SAMPLINGS, masks.MIXTURE)),
      'mask.count': one_of((*masks.COUNTS, masks.MIXTURE)),
      'mask.max_fraction': ((lambda value: 0 < value <= 1), 'use a fraction in (0, 1]'),
      'mask.mixture.sampling_weights': _mixture_weights(masks.SAMPLINGS),
      'mask.mixture.count_weights': _mixture_weights(masks.COUNTS),
      'mask.power_law_exponent': POSITIVE,
      'mask.gaussian_std': at_least(
          MIN_GAUSSIAN_STD, f'use a number >= {MIN_GAUSSIAN_STD} (a fraction of the image side)',
          integer=False),
      'mask.num_pixels': at_least(GRID_NUM_PIXELS, NUM_PIXELS_ALLOWED.format(
          count='the number of pixels of an image')),
      'data.validation_fraction': FRACTION,
      'data.test_fraction': FRACTION,
      'data.crop_size': NATURAL,
      'data.image_size': NATURAL,
      'data.num_workers': NATURAL,
      'data.max_images': NATURAL,
      **TRAIN_RULES,
      'train.precision': one_of(PRECISIONS),
      **{f'loss.weights.{name}': NON_NEGATIVE for name in config.loss.weights},
      'loss.balancing': one_of(balancing.UPDATES),
      'loss.softadapt.variant': one_of(balancing.VARIANTS),
      'loss.softadapt.scale': one_of(balancing.SCALES),
      'loss.softadapt.terms': (
          lambda terms: set(terms) <= set(names) and len(set(terms)) == len(terms),
          f'use a tuple of distinct terms of model={config.model}, method={config.method} from '
          f'{", ".join(names)}, e.g. "(\'{names[0]}\',\'{names[-1]}\')", or () for all'),
      'loss.softadapt.update_every': COUNT,
      'loss.softadapt.window': COUNT,
      'loss.softadapt.total': POSITIVE,
      'loss.softadapt.beta': FINITE,
      'distributed.num_processes': at_least(0, 'use an integer >= 1, or 0 for the environment'),
      'distributed.process_id': (
          lambda value: -1 <= value and (value < num_processes or num_processes == 0),
          'use an integer from 0 to distributed.num_processes - 1, or -1 for the environment'),
      **{f'{config.model}.{key}': rule for key, rule in FAMILY_RULES[config.model].items()},
  })


def grid_num_pixels(height, width):
  """The default fixed count of (H, W) images: one pixel per s x s block, s = 2 on images under
  16 pixels a side, else 4 (the exact masks then form the grid of stride s)."""
  stride = 2 if min(height, width) < 16 else 4
  return height * width // stride ** 2


def resolve_for_images(config, image_shape):
  """A copy of `config` whose defaults that depend on the images, of (H, W, C) `image_shape`,
  are set: mask.num_pixels=-1 becomes grid_num_pixels. Explicit values are kept."""
  config = config.copy_and_resolve_references()
  if config.mask.num_pixels == GRID_NUM_PIXELS:
    config.mask.num_pixels = grid_num_pixels(*image_shape[:2])
  return config


def validate_for_data(config, splits):
  """Checks the keys that depend on the loaded images, of a config resolved for them."""
  height, width, _ = splits.train.shape[1:]
  check(config, {
      'mask.num_pixels': ((lambda value: 0 <= value <= height * width), NUM_PIXELS_ALLOWED.format(
          count=f'{height * width} (the pixels of {height}x{width} images)')),
      'train.batch_size': batch_fits(len(splits.train))})
