"""Default configs and up-front validation.

Every file in configs/ is `get_config(arg)` over `base_config`; `arg` is a
comma-separated list whose words name the data set and/or the thesis's
network configuration by number, e.g. 'digits', 'idx,2', '3'.
"""
import ml_collections

from mtvae_jax import balancing
from mtvae_jax import data
from mtvae_jax import masks
from mtvae_jax import models
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
# Observed pixels for the fixed-count masks: a stride-2 grid on 8x8 digits, a stride-4 grid
# elsewhere (7x7 on 28x28, 8x8 on 32x32, 16x16 on 64x64); the fallback serves sets of any size.
# What a non-finite loss does: stop training, or leave the batch out and count it.
NONFINITE_ACTIONS = ('stop', 'skip')
DEFAULT_NUM_PIXELS = {'digits': 16, 'mnist': 49, 'fashion_mnist': 49, 'cifar10': 64,
                      'celeb_a': 256}
FALLBACK_NUM_PIXELS = 49


def base_config(model, method, arg=None):
  """The config of `model` ('gaussian' | 'vq') trained by `method` ('none' | 'multi' | 'single')."""
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
  dataset = names[0] if names else 'digits'

  config = ml_collections.ConfigDict()
  config.model = model
  config.method = method
  # How the conditioned decoder takes in m: 'dense' (the thesis's layer) or 'spatial'.
  config.conditioning = 'dense'
  config.preset = preset
  config.seed = 0

  config.data = ml_collections.ConfigDict(dict(
      name=dataset, path='', validation_fraction=0.1, test_fraction=0.1, num_folds=0, fold=0,
      tfds_data_dir='', crop_size=0, image_size=0, num_workers=2, cache_dir=''))

  config.gaussian = ml_collections.ConfigDict(PRESETS['gaussian'][preset if model == 'gaussian' else 1])
  config.vq = ml_collections.ConfigDict(dict(
      PRESETS['vq'][preset if model == 'vq' else 1], commitment_cost=0.25))

  config.mask = ml_collections.ConfigDict(dict(
      sampling='exact' if method == 'multi' else 'uniform',
      count='power_law' if method == 'single' else 'fixed',
      num_pixels=DEFAULT_NUM_PIXELS.get(dataset, FALLBACK_NUM_PIXELS),
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
      softadapt=dict(variant='normalized', terms=(), beta=1.0, update_every=10, window=10,
                     total=1.0)))

  # The latest state is checkpointed every checkpoint_every_steps steps (0: at epoch ends
  # only), at each epoch end and on SIGTERM/SIGINT; rerunning the same command resumes.
  config.train = ml_collections.ConfigDict(dict(
      num_epochs=100, batch_size=128, learning_rate=1e-3, weight_decay=1e-4,
      checkpoint_every_steps=500, keep_checkpoints=3, on_nonfinite='stop'))

  # Several hosts (mtvae_jax.parallel): unset values ('', 0, -1) come from the environment
  # variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or the cluster.
  # Where a run executes, not what it trains: left out when a workdir's run is compared.
  config.distributed = ml_collections.ConfigDict(dict(
      coordinator_address='', num_processes=0, process_id=-1))
  return config


def _require(ok, key, value, allowed):
  if not ok:
    raise UserError(f'config.{key}={value!r} is not allowed: {allowed}')


def _one_of(config, key, choices):
  value = config
  for part in key.split('.'):
    value = value[part]
  _require(value in choices, key, value, 'use one of ' + ', '.join(choices))


def validate(config):
  """Checks every key that does not depend on the data; raises UserError on the first bad one."""
  _one_of(config, 'model', tuple(models.MODELS))
  _one_of(config, 'method', models.METHODS)
  _one_of(config, 'conditioning', models.CONDITIONINGS)
  _one_of(config, 'data.name', tuple(data.DATASETS))
  _one_of(config, 'mask.sampling', (*masks.SAMPLINGS, masks.MIXTURE))
  _one_of(config, 'mask.count', (*masks.COUNTS, masks.MIXTURE))
  mask = config.mask
  _require(0 < mask.max_fraction <= 1, 'mask.max_fraction', mask.max_fraction,
           'use a fraction in (0, 1]')
  for key, names in (('sampling_weights', masks.SAMPLINGS), ('count_weights', masks.COUNTS)):
    weights = dict(mask.mixture[key])
    _require(set(weights) == set(names) and min(weights.values()) >= 0
             and sum(weights.values()) > 0, f'mask.mixture.{key}', weights,
             f'give a weight >= 0 to each of {", ".join(names)}, not all 0')
  _require(mask.power_law_exponent > 0, 'mask.power_law_exponent', mask.power_law_exponent,
           'use a number > 0')
  _require(mask.gaussian_std > 0, 'mask.gaussian_std', mask.gaussian_std, 'use a number > 0')
  _require(mask.num_pixels >= 0, 'mask.num_pixels', mask.num_pixels,
           'use a count from 0 to the number of pixels of an image')
  for key in ('validation_fraction', 'test_fraction'):
    value = config.data[key]
    _require(0 < value < 1, f'data.{key}', value, 'use a value in (0, 1)')
  for key in ('crop_size', 'image_size', 'num_workers'):
    _require(config.data[key] >= 0, f'data.{key}', config.data[key], 'use an integer >= 0')
  for key in ('num_epochs', 'batch_size'):
    _require(config.train[key] >= 1, f'train.{key}', config.train[key], 'use an integer >= 1')
  _require(config.train.learning_rate > 0, 'train.learning_rate', config.train.learning_rate,
           'use a number > 0')
  _one_of(config, 'train.on_nonfinite', NONFINITE_ACTIONS)
  _require(config.train.checkpoint_every_steps >= 0, 'train.checkpoint_every_steps',
           config.train.checkpoint_every_steps, 'use an integer >= 0 (0: at epoch ends only)')
  _require(config.train.keep_checkpoints >= 1, 'train.keep_checkpoints',
           config.train.keep_checkpoints, 'use an integer >= 1')
  _require(config.train.weight_decay >= 0, 'train.weight_decay', config.train.weight_decay,
           'use a number >= 0')
  for name, weight in config.loss.weights.items():
    _require(weight >= 0, f'loss.weights.{name}', weight, 'use a number >= 0')
  _validate_balancing(config)
  distributed = config.distributed
  _require(distributed.num_processes >= 0, 'distributed.num_processes', distributed.num_processes,
           'use an integer >= 1, or 0 for the environment')
  _require(-1 <= distributed.process_id and (distributed.process_id < distributed.num_processes
                                             or distributed.num_processes == 0),
           'distributed.process_id', distributed.process_id,
           'use an integer from 0 to distributed.num_processes - 1, or -1 for the environment')
  family = config[config.model]
  _require(len(family.hidden_sizes) >= 1 and min(family.hidden_sizes) >= 1,
           f'{config.model}.hidden_sizes', tuple(family.hidden_sizes),
           'use one or more positive channel counts')
  for key in ('latent_dim', 'num_embeddings', 'embedding_dim'):
    if key in family:
      _require(family[key] >= 1, f'{config.model}.{key}', family[key], 'use an integer >= 1')
  if config.model == 'vq':
    _require(family.num_residual_layers >= 0, 'vq.num_residual_layers',
             family.num_residual_layers, 'use an integer >= 0')
    _require(family.commitment_cost >= 0, 'vq.commitment_cost', family.commitment_cost,
             'use a number >= 0')


def _validate_balancing(config):
  _one_of(config, 'loss.balancing', tuple(balancing.UPDATES))
  softadapt = config.loss.softadapt
  _one_of(config, 'loss.softadapt.variant', tuple(balancing.VARIANTS))
  names = balancing.term_names(config.model, config.method)
  terms = tuple(softadapt.terms)
  _require(set(terms) <= set(names) and len(set(terms)) == len(terms), 'loss.softadapt.terms',
           terms, f'use a tuple of distinct terms of model={config.model}, method={config.method} '
           f'from {", ".join(names)}, e.g. "(\'{names[0]}\',\'{names[-1]}\')", or () for all')
  for key in ('update_every', 'window'):
    _require(softadapt[key] >= 1, f'loss.softadapt.{key}', softadapt[key], 'use an integer >= 1')
  _require(softadapt.total > 0, 'loss.softadapt.total', softadapt.total, 'use a number > 0')


def validate_for_data(config, splits):
  """Checks the keys that depend on the loaded images."""
  height, width, _ = splits.train.shape[1:]
  _require(config.mask.num_pixels <= height * width, 'mask.num_pixels', config.mask.num_pixels,
           f'use a count from 0 to {height * width}, the pixels of a {height}x{width} image')
  _require(config.train.batch_size <= len(splits.train), 'train.batch_size',
           config.train.batch_size, f'use at most {len(splits.train)}, the training images')
