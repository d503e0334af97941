"""Training and evaluation: config -> data -> model -> jitted steps -> loop -> outputs.

Work directory layout:
  config.json     the resolved config
  history.jsonl   one line per epoch: train/ and val/ metrics, weights/, seconds, images/s
  events.out.tfevents.*  the same scalars and an image grid now and then, for TensorBoard
  checkpoints/best/    orbax checkpoint of the best epoch by validation loss
  checkpoints/latest/  the last few full training states, for resuming
  metrics.json    test metrics of the best checkpoint
"""
import contextlib
import functools
import json
import pathlib
import shutil
import signal
import sys
import threading
import time
from typing import Any, NamedTuple

from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from mtvae_jax import balancing
from mtvae_jax import checkpoints
from mtvae_jax import config as config_lib
from mtvae_jax import data
from mtvae_jax import events
from mtvae_jax import losses
from mtvae_jax import masks
from mtvae_jax import models
from mtvae_jax import parallel
from mtvae_jax.data import pipeline
from mtvae_jax.errors import UserError


class TrainState(train_state.TrainState):
  batch_stats: Any
  balancing: balancing.State


def create_train_state(config, model, image_shape, key):
  """Parameters, batch-norm statistics and loss-balancing state from `key`, with AdamW.

  Built inside jit so that every leaf (the step counter included) is a
  device array of fixed dtype and the train step compiles once; replicated
  on every device.
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
                             batch_stats=variables.get('batch_stats', {}), tx=tx,
                             balancing=balancing.init(config))

  return jax.jit(init, out_shardings=parallel.replicated())(key)


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
  """One AdamW step on a batch (B, H, W, C); masks are drawn fresh per image.

  The loss weights are those in state.balancing, which the step then updates.
  """
  key = jax.random.fold_in(base_key, state.step)
  mask_key, z_key = jax.random.split(key)
  conds = train_conds(config, images, mask_key)

  def loss_fn(params):
    terms, batch_stats = loss_terms(state, params, images, conds, z_key, train=True)
    means = {name: jnp.mean(value) for name, value in terms.items()}
    loss = losses.weighted_sum(means, state.balancing.weights)
    return loss, (means, batch_stats)

  (loss, (means, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats,
                                balancing=balancing.update(state.balancing, means, config))
  return state, dict(_metric_names(means), loss=loss)


def donates_state():
  """Whether the jitted train steps donate the state (params, optimizer state) they update.

  On accelerators, yes: one copy of the state in memory. On CPUs, no: there
  XLA copies each donated parameter that an input gradient still reads once
  the parameter's own update is ready (37 MB a step in VQ configuration 2,
  method single), slower than writing the new state to fresh memory.
  """
  return jax.default_backend() != 'cpu'


def guarded_step(state, sums, health, images, base_key, *, config):
  """`train_step` that keeps non-finite updates out, and adds the batch's metrics to `sums`.

  sums: {metric: ()} running sums plus 'steps', the batches summed.
  health: {'bad_step': first step whose loss or new parameters were not
  finite (-1: none), 'bad_term': index of its first non-finite metric in
  sorted order (the metric count: the parameters), 'skipped': batches left out}.
  With train.on_nonfinite='stop' the state stays at the last good step from
  the first failure on; with 'skip' each failing batch is left out.
  """
  new_state, metrics = train_step(state, images, base_key, config=config)
  finite = jnp.stack([jnp.isfinite(metrics[name]) for name in sorted(metrics)]
                     + [jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_state.params)])
  ok = jnp.all(finite)
  first = health['bad_step'] < 0
  apply = ok & first if config.train.on_nonfinite == 'stop' else ok
  state = jax.tree.map(lambda new, old: jnp.where(apply, new, old), new_state, state)
  state = state.replace(step=new_state.step)
  sums = jax.tree.map(lambda total, value: total + jnp.where(ok, value, 0), sums,
                      dict(metrics, steps=jnp.ones((), jnp.float32)))
  record = ~ok & first
  health = {'bad_step': jnp.where(record, new_state.step - 1, health['bad_step']),
            'bad_term': jnp.where(record, jnp.minimum(jnp.argmin(finite), len(metrics)),
                                  health['bad_term']),
            'skipped': health['skipped'] + (~ok).astype(jnp.int32)}
  return state, sums, health


def eval_step(state, images, weights, key, *, config):
  """Sums over the batch of each term, weighted by `weights` (B,) (0 for padding)."""
  mask_key, z_key = jax.random.split(key)
  conds = eval_conds(config, images, mask_key)
  terms, _ = loss_terms(state, state.params, images, conds, z_key, train=False)
  terms['loss'] = losses.weighted_sum(terms, dict(config.loss.weights))
  return {name: jnp.sum(value * weights) for name, value in _metric_names(terms).items()}


def _metric_names(terms):
  return {name if name == 'loss' else f'{name}_loss': value for name, value in terms.items()}


def padded_batches(array, batch_size, num_workers=0):
  """(batch, weights (B,)) pairs: all rows of `array` in order, in batches of one shape.

  `array` has any rank, or is a data.pipeline.Source (streamed by num_workers
  processes). The last batch is padded with row 0; weights are 1 for real
  rows, 0 for padding.
  """
  rows, weights = pipeline.eval_order(len(array), batch_size)
  return zip(pipeline.batches(array, rows, num_workers), weights)


def evaluate(eval_fn, state, images, batch_size, key, num_workers=0):
  """Metrics averaged over all `images` (any rank, or a Source), in padded batches of one shape."""
  sums = None
  for index, (batch, weights) in enumerate(padded_batches(images, batch_size, num_workers)):
    out = eval_fn(state, batch, weights, jax.random.fold_in(key, index))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  return {name: float(value) / len(images) for name, value in jax.device_get(sums).items()}


# Config keys that say where and how a run executes, not what it trains.
RUN_PLACE = ('distributed.', 'data.cache_dir', 'data.num_workers')


def finished_run(config, workdir):
  """Metrics of a finished run of `config` in `workdir`, or None; refuses another config's run."""
  workdir = pathlib.Path(workdir)
  if not (workdir / 'config.json').exists():
    return None
  previous, current = (
      {k: v for k, v in _flatten(c).items() if not k.startswith(RUN_PLACE)}
      for c in (json.loads((workdir / 'config.json').read_text()),
                json.loads(config.to_json_best_effort())))
  changed = sorted(k for k in previous.keys() | current.keys() if previous.get(k) != current.get(k))
  if changed:
    raise UserError(f"workdir '{workdir}' holds a run of another config (differs at "
                    f"{', '.join(changed)}): choose another --workdir")
  if (workdir / 'metrics.json').exists():
    return json.loads((workdir / 'metrics.json').read_text())
  return None


def init_workdir(config, workdir, resume=False, needed_bytes=0):
  """Creates `workdir` with config.json, or says in one line why it cannot be written.

  Earlier checkpoints are removed unless `resume`. Fails up front when the
  disk has less than `needed_bytes` free.
  """
  workdir = pathlib.Path(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'config.json').write_text(config.to_json_best_effort(sort_keys=True, indent=2))
  except OSError as e:
    raise UserError(f"workdir '{workdir}' is not writable: {e.strerror}") from None
  free = shutil.disk_usage(workdir).free
  if free < needed_bytes:
    raise UserError(f"workdir '{workdir}' has {free / 2**20:.0f} MiB free, its checkpoints need "
                    f'about {needed_bytes / 2**20:.0f} MiB: free some space or choose another')
  if not resume:
    shutil.rmtree(workdir / 'checkpoints', ignore_errors=True)


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
  """Data, model and initial state for a validated config (deterministic by config.seed).

  The state and keys are replicated on every device; the batch size must
  split evenly over the devices.
  """
  parallel.initialize(config.distributed)
  parallel.check_batch_size(config.train.batch_size)
  splits = data.load(config.data, config.seed)
  config_lib.validate_for_data(config, splits)
  image_shape = splits.train.shape[1:]
  model = models.build_model(config, image_shape)
  keys = jax.jit(lambda: jax.random.split(jax.random.key(config.seed), 3),
                 out_shardings=parallel.replicated())()
  state = create_train_state(config, model, image_shape, keys[0])
  return Run(config, splits, model, state, keys[1], keys[2])


def load_config(workdir):
  """The config of the finished run in `workdir`."""
  workdir = pathlib.Path(workdir)
  if not (workdir / 'metrics.json').exists():
    raise UserError(f"workdir '{workdir}' holds no finished run (no metrics.json): train it first")
  stored = json.loads((workdir / 'config.json').read_text())
  # Keys added since the run was written take their defaults.
  config = config_lib.base_config(stored['model'], stored['method'])
  config.update(stored)
  return config


def load_run(workdir) -> Run:
  """A finished run of `workdir`, its state restored from the best checkpoint."""
  run = setup(load_config(workdir))
  best, _ = checkpoints.managers(workdir, keep_latest=1)
  return run._replace(state=checkpoints.restore_best(best, run.state))


POLL_STEPS = 10  # with several processes, how often they check for a stop signal


class _StopSignal:
  """Records SIGTERM/SIGINT instead of dying, so the loop can checkpoint first."""

  def __init__(self):
    self.received = None

  def __enter__(self):
    self._previous = {}
    if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
      self._previous = {sig: signal.signal(sig, self._handle)
                        for sig in (signal.SIGTERM, signal.SIGINT)}
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def requested(self, step):
    """Whether to stop after `step`. With several processes they agree every POLL_STEPS steps
    (a collective), so all stop at the same step."""
    if jax.process_count() == 1:
      return self.received is not None
    return step % POLL_STEPS == 0 and parallel.any_process(self.received is not None)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _check_health(health, metric_names, workdir, config):
  """Raises UserError naming the step and term of the first non-finite loss ('stop' mode)."""
  health = jax.device_get(health)
  if config.train.on_nonfinite == 'stop' and health['bad_step'] >= 0:
    term = (metric_names + ['parameters'])[int(health['bad_term'])]
    raise UserError(f'non-finite {term} at step {int(health["bad_step"])}: training stopped, the '
                    f'last good checkpoints are kept in {workdir}/checkpoints; lower '
                    'train.learning_rate, or set train.on_nonfinite=skip to leave such batches out')
  return health


def _history(path, first_epoch):
  """history.jsonl opened for appending, without lines of epochs >= first_epoch (redone)."""
  kept = []
  if path.exists():
    kept = [line for line in path.read_text().splitlines()
            if line and json.loads(line)['epoch'] < first_epoch]
  path.write_text(''.join(line + '\n' for line in kept))
  return open(path, 'a')


def train_and_evaluate(config, workdir) -> dict:
  """Trains config's model, keeps the best epoch by validation loss, returns its test metrics.

  Writes config.json, history.jsonl, checkpoints/ and metrics.json into `workdir`.
  Rerunning on the workdir of an unfinished run of the same config resumes it
  from its latest checkpoint and ends with the same metrics as an
  uninterrupted run. Raises UserError for a bad config, bad data, a workdir
  of another config, a non-finite loss ('stop' mode) or SIGTERM/SIGINT (after
  checkpointing).
  """
  config_lib.validate(config)
  finished = finished_run(config, workdir)
  if finished is not None:
    print(f'{workdir} holds a finished run of this config; its metrics.json is kept.')
    return finished
  resume = (pathlib.Path(workdir) / 'config.json').exists()
  run = setup(config)  # loads the data and checks the keys that depend on it
  splits, state = run.splits, run.state
  writes = parallel.is_writer()
  parallel.sync('workdir read')  # by every process, before process 0 changes it
  if writes:
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    init_workdir(config, workdir, resume,
                 needed_bytes=state_bytes * (config.train.keep_checkpoints + 2))
  parallel.sync('workdir ready')
  workdir = pathlib.Path(workdir).absolute()
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f'{config.model} VAE, method {config.method}: {num_params:,} parameters; data '
        f'{config.data.name} {splits.train.shape[1:]}: {len(splits.train)} train, '
        f'{len(splits.validation)} validation, {len(splits.test)} test images')

  replicated = parallel.replicated()
  train_fn = jax.jit(functools.partial(guarded_step, config=config),
                     donate_argnums=(0, 1, 2) if donates_state() else (1, 2),
                     out_shardings=replicated)
  eval_fn = jax.jit(functools.partial(eval_step, config=config), out_shardings=replicated)
  batch_size = config.train.batch_size
  steps_per_epoch = len(splits.train) // batch_size
  train_images, val_images, test_images = map(pipeline.to_device, splits)
  best_checkpoints, latest_checkpoints = checkpoints.managers(workdir, config.train.keep_checkpoints)

  _, metric_shapes = jax.eval_shape(functools.partial(train_step, config=config),
                                    state, jax.ShapeDtypeStruct((batch_size, *splits.train.shape[1:]),
                                                                jnp.float32), run.train_key)
  metric_names = sorted(metric_shapes)
  zero_sums = lambda: parallel.replicate(
      {name: np.zeros((), np.float32) for name in [*metric_names, 'steps']})
  sums = zero_sums()
  health = parallel.replicate({name: np.array(value, np.int32) for name, value in
                               (('bad_step', -1), ('bad_term', -1), ('skipped', 0))})
  position = {'epoch': 1, 'step': 0, 'best_loss': float('inf'), 'best_epoch': 0}
  restored = checkpoints.restore_latest(
      latest_checkpoints, {'state': state, 'sums': sums, 'health': health}) if resume else None
  if restored:
    (tree, position) = restored
    state, sums, health = tree['state'], tree['sums'], tree['health']
    print(f'resuming at epoch {position["epoch"]}, step {position["step"]}')

  def save_latest(epoch, step):
    _check_health(health, metric_names, workdir, config)
    checkpoints.save_latest(
        latest_checkpoints, (epoch - 1) * steps_per_epoch + step,
        {'state': state, 'sums': sums, 'health': health},
        dict(position, epoch=epoch, step=step))

  every = config.train.checkpoint_every_steps
  try:
    with contextlib.ExitStack() as stack:
      stop = stack.enter_context(_StopSignal())
      if writes:  # only process 0 writes files
        history = stack.enter_context(_history(workdir / 'history.jsonl', position['epoch']))
      writer = stack.enter_context(events.EventWriter(
          workdir, functools.partial(eval_conds, config), splits.validation, run.eval_key,
          first_epoch=position['epoch'], enabled=writes))
      for epoch in range(position['epoch'], config.train.num_epochs + 1):
        start = time.perf_counter()
        first_step = position['step'] if epoch == position['epoch'] else 0
        order = pipeline.epoch_order(config.seed, epoch, len(splits.train), batch_size)[first_step:]
        batches = pipeline.batches(train_images, order, config.data.num_workers)
        for step, batch in enumerate(tqdm.tqdm(batches, total=len(order), desc=f'epoch {epoch}',
                                               leave=False, disable=None, file=sys.stderr),
                                     start=first_step + 1):
          state, sums, health = train_fn(state, sums, health, batch, run.train_key)
          due = every and step < steps_per_epoch and ((epoch - 1) * steps_per_epoch + step) % every == 0
          stopping = stop.requested(step)
          if stopping or due:
            save_latest(epoch, step)
          if stopping:
            raise UserError(f'stopped by {stop.received or "a signal to another process"} at epoch '
                            f'{epoch}, step {step}: the state is checkpointed in {workdir}/'
                            'checkpoints; rerun the same command to resume')
        health = _check_health(health, metric_names, workdir, config)
        totals = jax.device_get(sums)
        train_metrics = {name: totals[name] / max(totals['steps'], 1) for name in metric_names}
        seconds = time.perf_counter() - start
        val_metrics = evaluate(eval_fn, state, val_images, batch_size, run.eval_key,
                               config.data.num_workers)
        weights = {k: float(v) for k, v in jax.device_get(state.balancing.weights).items()}
        record = {'epoch': epoch,
                  **{f'train/{k}': float(v) for k, v in train_metrics.items()},
                  **{f'val/{k}': v for k, v in val_metrics.items()},
                  **{f'weights/{k}': v for k, v in weights.items()},
                  'skipped_steps': int(health['skipped']),
                  'seconds': seconds, 'images_per_s': len(order) * batch_size / seconds}
        if writes:
          history.write(json.dumps(record) + '\n')
          history.flush()
        writer.write(record, state)
        if val_metrics['loss'] < position['best_loss']:
          position.update(best_loss=val_metrics['loss'], best_epoch=epoch)
          checkpoints.save_best(best_checkpoints, epoch, state)
        sums = zero_sums()
        save_latest(epoch + 1, 0)
        print(f'epoch {epoch}: train {_format(train_metrics)} | val {_format(val_metrics)} | '
              f'weights {_format(weights)} | {record["images_per_s"]:.0f} images/s', flush=True)
  finally:  # an exception must not lose a checkpoint still being written
    best_checkpoints.wait_until_finished()
    latest_checkpoints.wait_until_finished()

  state = checkpoints.restore_best(best_checkpoints, state, position['best_epoch'])
  test_metrics = evaluate(eval_fn, state, test_images, batch_size, run.eval_key,
                         config.data.num_workers)
  result = dict(test_metrics, best_epoch=position['best_epoch'],
                best_val_loss=position['best_loss'], num_params=int(num_params))
  if writes:
    (workdir / 'metrics.json').write_text(json.dumps(result, indent=2) + '\n')
  print(f'test (best epoch {position["best_epoch"]}): {_format(test_metrics)}')
  return result
