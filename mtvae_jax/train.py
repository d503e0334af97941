"""Training and evaluation: config -> data -> model -> jitted steps -> loop -> outputs.

Work directory layout:
  config.json     the resolved config
  history.jsonl   one line per epoch: train/ and val/ metrics, seconds, images/s
  checkpoints/best/  orbax checkpoint of the best epoch by validation loss
  metrics.json    test metrics of the best checkpoint
"""
import functools
import json
import pathlib
import shutil
import sys
import time
from typing import Any, NamedTuple

import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from mtvae_jax import config as config_lib
from mtvae_jax import data
from mtvae_jax import losses
from mtvae_jax import masks
from mtvae_jax import models
from mtvae_jax.errors import UserError


class TrainState(train_state.TrainState):
  batch_stats: Any


def create_train_state(config, model, image_shape, key):
  """Parameters and batch-norm statistics from `key`, with AdamW.

  Built inside jit so that every leaf (the step counter included) is a
  device array of fixed dtype and the train step compiles once.
  """
  height, width, channels = image_shape
  images = jnp.zeros((1, height, width, channels))
  m = jnp.zeros((1, height, width, channels + 1))
  conds = {'recon': None} if config.method == 'none' else {'recon': None, 'recon_cond': m}
  tx = optax.adamw(config.train.learning_rate, weight_decay=config.train.weight_decay)

  def init(key):
    init_key, z_key = jax.random.split(key)
    variables = model.init(init_key, images, conds, z_key, train=False)
    return TrainState.create(apply_fn=model.apply, params=variables['params'],
                             batch_stats=variables.get('batch_stats', {}), tx=tx)

  return jax.jit(init)(key)


def train_conds(config, images, key):
  """The decoders' inputs during training: {term name: m or None} (thesis 3.2, 3.3)."""
  if config.method == 'none':
    return {'recon': None}
  m = masks.conditioning(images, masks.batch_masks(key, images, masks.mask_fn(config.mask)))
  if config.method == 'single':  # one decoder, a power-law number of observed pixels
    return {'recon': m}
  return {'recon': None, 'recon_cond': m}


def eval_conds(config, images, key):
  """Evaluation: decoder 1 (or the empty mask) and the fixed-count evaluation mask."""
  if config.method == 'none':
    return {'recon': None}
  sampler = masks.mask_fn(config.mask, count='fixed')
  return {'recon': None,
          'recon_cond': masks.conditioning(images, masks.batch_masks(key, images, sampler))}


def loss_terms(state, params, images, conds, key, train):
  """Per-example loss terms {name: (B,)} and the new batch-norm statistics."""
  variables = {'params': params, 'batch_stats': state.batch_stats}
  (outputs, terms), updates = state.apply_fn(
      variables, images, conds, key, train=train, mutable=['batch_stats'])
  terms = dict(terms, **{name: losses.mse(images, out) for name, out in outputs.items()})
  return terms, updates['batch_stats']


def train_step(state, images, base_key, *, config):
  """One AdamW step on a batch (B, H, W, C); masks are drawn fresh per image."""
  key = jax.random.fold_in(base_key, state.step)
  mask_key, z_key = jax.random.split(key)
  conds = train_conds(config, images, mask_key)
  weights = dict(config.loss.weights)

  def loss_fn(params):
    terms, batch_stats = loss_terms(state, params, images, conds, z_key, train=True)
    means = {name: jnp.mean(value) for name, value in terms.items()}
    loss = losses.weighted_sum(means, weights)
    return loss, (means, batch_stats)

  (loss, (means, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, dict(_metric_names(means), loss=loss)


def eval_step(state, images, weights, key, *, config):
  """Sums over the batch of each term, weighted by `weights` (B,) (0 for padding)."""
  mask_key, z_key = jax.random.split(key)
  conds = eval_conds(config, images, mask_key)
  terms, _ = loss_terms(state, state.params, images, conds, z_key, train=False)
  terms['loss'] = losses.weighted_sum(terms, dict(config.loss.weights))
  return {name: jnp.sum(value * weights) for name, value in _metric_names(terms).items()}


def _metric_names(terms):
  return {name if name == 'loss' else f'{name}_loss': value for name, value in terms.items()}


def evaluate(eval_fn, state, images, batch_size, key):
  """Metrics averaged over all `images`; the last batch is padded to keep one shape."""
  sums = None
  for index, start in enumerate(range(0, len(images), batch_size)):
    batch = images[start:start + batch_size]
    weights = np.zeros(batch_size, np.float32)
    weights[:len(batch)] = 1.0
    batch = np.pad(batch, ((0, batch_size - len(batch)), (0, 0), (0, 0), (0, 0)))
    out = eval_fn(state, batch, weights, jax.random.fold_in(key, index))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  return {name: float(value) / len(images) for name, value in jax.device_get(sums).items()}


def prepare_workdir(config, workdir):
  """Refuses a directory holding another config's run; returns finished metrics or None."""
  workdir = pathlib.Path(workdir)
  config_json = config.to_json_best_effort(sort_keys=True, indent=2)
  if (workdir / 'config.json').exists():
    previous = json.loads((workdir / 'config.json').read_text())
    if previous != json.loads(config_json):
      changed = sorted(k for k in _flatten(previous).keys() | _flatten(json.loads(config_json)).keys()
                       if _flatten(previous).get(k) != _flatten(json.loads(config_json)).get(k))
      raise UserError(f"workdir '{workdir}' holds a run of another config (differs at "
                      f"{', '.join(changed)}): choose another --workdir")
    if (workdir / 'metrics.json').exists():
      return json.loads((workdir / 'metrics.json').read_text())
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'config.json').write_text(config_json)
  except OSError as e:
    raise UserError(f"workdir '{workdir}' is not writable: {e.strerror}") from None
  shutil.rmtree(workdir / 'checkpoints', ignore_errors=True)
  return None


def _flatten(tree, prefix=''):
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f'{prefix}{key}.').items()}


def _format(metrics):
  return ' '.join(f'{name}={value:.4g}' for name, value in metrics.items())


class Run(NamedTuple):
  """What a config sets up: data, model, initial train state and random keys."""
  config: ml_collections.ConfigDict
  splits: data.Splits
  model: Any
  state: TrainState
  train_key: jax.Array
  eval_key: jax.Array


def setup(config) -> Run:
  """Data, model and initial state for a validated config (deterministic by config.seed)."""
  splits = data.load(config.data, config.seed)
  config_lib.validate_for_data(config, splits)
  image_shape = splits.train.shape[1:]
  model = models.build_model(config, image_shape)
  init_key, train_key, eval_key = jax.random.split(jax.random.key(config.seed), 3)
  state = create_train_state(config, model, image_shape, init_key)
  return Run(config, splits, model, state, train_key, eval_key)


def _best_checkpoints(workdir):
  return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / 'checkpoints' / 'best',
                               options=ocp.CheckpointManagerOptions(max_to_keep=1))


def _restore(manager, state, step):
  restored = manager.restore(step, args=ocp.args.StandardRestore(
      {'params': state.params, 'batch_stats': state.batch_stats}))
  return state.replace(params=restored['params'], batch_stats=restored['batch_stats'])


def load_run(workdir) -> Run:
  """A finished run of `workdir`, its state restored from the best checkpoint."""
  workdir = pathlib.Path(workdir)
  if not (workdir / 'metrics.json').exists():
    raise UserError(f"workdir '{workdir}' holds no finished run (no metrics.json): train it first")
  config = ml_collections.ConfigDict(json.loads((workdir / 'config.json').read_text()))
  run = setup(config)
  manager = _best_checkpoints(workdir)
  return run._replace(state=_restore(manager, run.state, manager.latest_step()))


def train_and_evaluate(config, workdir) -> dict:
  """Trains config's model, keeps the best epoch by validation loss, returns its test metrics.

  Writes config.json, history.jsonl, checkpoints/ and metrics.json into `workdir`.
  Raises UserError for a bad config, bad data or a workdir of another config.
  """
  config_lib.validate(config)
  finished = prepare_workdir(config, workdir)
  if finished is not None:
    print(f'{workdir} holds a finished run of this config; its metrics.json is kept.')
    return finished
  workdir = pathlib.Path(workdir).absolute()
  run = setup(config)
  splits, state = run.splits, run.state
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f'{config.model} VAE, method {config.method}: {num_params:,} parameters; data '
        f'{config.data.name} {splits.train.shape[1:]}: {len(splits.train)} train, '
        f'{len(splits.validation)} validation, {len(splits.test)} test images')

  train_fn = jax.jit(functools.partial(train_step, config=config), donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, config=config))
  batch_size = config.train.batch_size
  steps_per_epoch = len(splits.train) // batch_size
  train_images = jax.device_put(splits.train)
  checkpoints = _best_checkpoints(workdir)

  best_loss, best_epoch = np.inf, 0
  with open(workdir / 'history.jsonl', 'w') as history:
    for epoch in range(1, config.train.num_epochs + 1):
      start = time.perf_counter()
      order = np.random.default_rng([config.seed, epoch]).permutation(len(splits.train))
      step_metrics = []
      for step in tqdm.trange(steps_per_epoch, desc=f'epoch {epoch}', leave=False,
                              disable=None, file=sys.stderr):
        batch = train_images[order[step * batch_size:(step + 1) * batch_size]]
        state, metrics = train_fn(state, batch, run.train_key)
        step_metrics.append(metrics)
      train_metrics = jax.device_get(jax.tree.map(lambda *x: jnp.mean(jnp.stack(x)), *step_metrics))
      seconds = time.perf_counter() - start
      val_metrics = evaluate(eval_fn, state, splits.validation, batch_size, run.eval_key)
      record = {'epoch': epoch,
                **{f'train/{k}': float(v) for k, v in train_metrics.items()},
                **{f'val/{k}': v for k, v in val_metrics.items()},
                'seconds': seconds, 'images_per_s': steps_per_epoch * batch_size / seconds}
      history.write(json.dumps(record) + '\n')
      history.flush()
      if val_metrics['loss'] < best_loss:
        best_loss, best_epoch = val_metrics['loss'], epoch
        checkpoints.save(epoch, args=ocp.args.StandardSave(
            {'params': state.params, 'batch_stats': state.batch_stats}))
      print(f'epoch {epoch}: train {_format(train_metrics)} | val {_format(val_metrics)} | '
            f'{record["images_per_s"]:.0f} images/s', flush=True)

  checkpoints.wait_until_finished()
  state = _restore(checkpoints, state, best_epoch)
  test_metrics = evaluate(eval_fn, state, splits.test, batch_size, run.eval_key)
  result = dict(test_metrics, best_epoch=best_epoch, best_val_loss=best_loss,
                num_params=int(num_params))
  (workdir / 'metrics.json').write_text(json.dumps(result, indent=2) + '\n')
  print(f'test (best epoch {best_epoch}): {_format(test_metrics)}')
  return result
