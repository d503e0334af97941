"""The training loop of the VAE (train.py) and the PixelCNN prior (prior.py), and evaluation.

`fit` trains a `Task` by config.train in a work directory (workdir.py):
  - rerunning it on the directory of an unfinished run of the same config
    resumes from the latest checkpoint and ends with the same metrics;
  - SIGTERM/SIGINT checkpoint the state, then stop the run;
  - with several processes every one computes and process 0 alone writes;
  - each epoch appends a line to history.jsonl and TensorBoard scalars (events.py);
  - the epoch with the lowest validation `objective` is the best checkpoint,
    whose test metrics end the run in metrics.json.
The train step and the eval step each compile once per run.
"""
import contextlib
import functools
import pathlib
import signal
import sys
import threading
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from mtvae_jax import checkpoints
from mtvae_jax import events
from mtvae_jax import parallel
from mtvae_jax import workdir as workdir_lib
from mtvae_jax.data import pipeline
from mtvae_jax.errors import UserError

POLL_STEPS = 10  # with several processes, how often they check for a stop signal
HEALTHY = {'bad_step': -1, 'bad_term': -1, 'skipped': 0}


class Task(NamedTuple):
  """What `fit` trains.

  state: the initial train state, replicated on every device (a flax
    TrainState with `params` and `batch_stats`).
  train_step: (state, batch, key) -> (state, {metric: ()}), pure.
  eval_step: (state, batch, weights (B,), key) -> {metric: sum over the batch,
    weighted by `weights`; a pytree of arrays where eval_metrics makes it scalars}.
  splits: data.Splits whose rows form the batches (images, or codes).
  train_key, eval_key: the keys of the steps, folded with the step or batch index.
  objective: the validation metric whose lowest epoch is kept.
  eval_metrics: eval_step's sums averaged over a split -> {metric: ()}.
  extras: state -> {group: {name: ()}}, values recorded each epoch as group/name.
  grid: None, or state -> (H, W, C) image, drawn into TensorBoard (events.py).
  """
  state: Any
  train_step: Callable
  eval_step: Callable
  splits: Any
  train_key: jax.Array
  eval_key: jax.Array
  objective: str = 'loss'
  eval_metrics: Callable = lambda means: means
  extras: Callable = lambda state: {}
  grid: Optional[Callable] = None


def donates_state():
  """Whether the jitted train steps donate the state (params, optimizer state) they update.

  On accelerators, yes: one copy of the state in memory. On CPUs, no: there
  XLA copies each donated parameter that an input gradient still reads once
  the parameter's own update is ready, slower than writing the new state to
  fresh memory.
  """
  return jax.default_backend() != 'cpu'


def guarded_step(state, sums, health, batch, key, *, step_fn, on_nonfinite):
  """step_fn(state, batch, key), keeping non-finite updates out; adds its metrics to `sums`.

  sums: {metric: ()} running sums plus 'steps', the batches summed.
  health: {'bad_step': first step whose metrics or new parameters were not
  finite (-1: none), 'bad_term': index of its first non-finite metric in
  sorted order (the metric count: the parameters), 'skipped': batches left out}.
  With on_nonfinite='stop' the state stays at the last good step from the
  first failure on; with 'skip' each failing batch is left out.
  """
  new_state, metrics = step_fn(state, batch, key)
  finite = jnp.stack([jnp.isfinite(metrics[name]) for name in sorted(metrics)]
                     + [jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_state.params)])
  ok = jnp.all(finite)
  first = health['bad_step'] < 0
  apply = ok & first if on_nonfinite == 'stop' else ok
  # cond, not a select per leaf: XLA:CPU then runs no kernel per leaf of the state.
  state = jax.lax.cond(apply, lambda: new_state, lambda: state).replace(step=new_state.step)
  sums = jax.tree.map(lambda total, value: total + jnp.where(ok, value, 0), sums,
                      dict(metrics, steps=jnp.ones((), jnp.float32)))
  record = ~ok & first
  health = {'bad_step': jnp.where(record, new_state.step - 1, health['bad_step']),
            'bad_term': jnp.where(record, jnp.minimum(jnp.argmin(finite), len(metrics)),
                                  health['bad_term']),
            'skipped': health['skipped'] + (~ok).astype(jnp.int32)}
  return state, sums, health


def padded_batches(array, batch_size, num_workers=0):
  """(batch, weights (B,)) pairs: all rows of `array` in order, in batches of one shape.

  `array` has any rank, or is a data.pipeline.Source (streamed by num_workers
  processes). The last batch is padded with row 0; weights are 1 for real
  rows, 0 for padding.
  """
  rows, weights = pipeline.eval_order(len(array), batch_size)
  return zip(pipeline.batches(array, rows, num_workers), weights)


def evaluate(eval_fn, state, images, batch_size, key, num_workers=0,
             finish=lambda means: means):
  """Metrics averaged over all `images` (any rank, or a Source), in padded batches of one shape.

  eval_fn's sums may be pytrees of arrays; finish turns their averages into
  {metric: ()}.
  """
  sums = None
  for index, (batch, weights) in enumerate(padded_batches(images, batch_size, num_workers)):
    out = eval_fn(state, batch, weights, jax.random.fold_in(key, index))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  means = jax.tree.map(lambda value: np.asarray(value, np.float64) / len(images),
                       jax.device_get(sums))
  return {name: float(value) for name, value in finish(means).items()}


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


def _check_health(health, metric_names, workdir, on_nonfinite):
  """A host copy of `health`; UserError naming the step and term of the first non-finite
  metric in 'stop' mode."""
  health = jax.device_get(health)
  if on_nonfinite == 'stop' and health['bad_step'] >= 0:
    term = (metric_names + ['parameters'])[int(health['bad_term'])]
    raise UserError(f'non-finite {term} at step {int(health["bad_step"])}: training stopped, the '
                    f'last good checkpoints are kept in {workdir}/checkpoints; lower '
                    'train.learning_rate, or set train.on_nonfinite=skip to leave such batches out')
  return health


def _batch_spec(images, batch_size):
  """Shape and dtype of a training batch; a Source's uint8 images arrive as float32."""
  dtype = jnp.float32 if isinstance(images, pipeline.Source) else images.dtype
  return jax.ShapeDtypeStruct((batch_size, *images.shape[1:]), dtype)


def format_metrics(metrics):
  """One line of {name: value}: 'loss', then the other losses, then the rest, each by name;
  floats with 4 significant digits, also inside lists."""
  order = sorted(metrics, key=lambda name: (name != 'loss', not name.endswith('loss'), name))
  return ' '.join(f'{name}={_format_value(metrics[name])}' for name in order)


def _format_value(value):
  if isinstance(value, float):
    return f'{value:.4g}'
  if isinstance(value, (list, tuple)):
    return '[' + ', '.join(map(_format_value, value)) + ']'
  return str(value)


def fit(task, config, workdir, summarize, num_workers=0) -> dict:
  """Trains `task` by config.train (and config.seed) in `workdir`; returns its metrics.json.

  summarize(test metrics, best epoch, its validation objective) -> the
  content of metrics.json. num_workers: processes that decode a streamed
  split (data.pipeline). The caller holds the workdir's lock
  (workdir.writer_lock). Raises UserError for a workdir that cannot be
  written, a non-finite metric ('stop' mode) or SIGTERM/SIGINT (after
  checkpointing).
  """
  workdir = pathlib.Path(workdir).absolute()
  state, splits, train_config = task.state, task.splits, config.train
  resume = (workdir / workdir_lib.CONFIG).exists()
  writes = parallel.is_writer()
  parallel.sync('workdir read')  # by every process, before process 0 changes it
  if writes:
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    workdir_lib.init_workdir(config, workdir, resume,
                             needed_bytes=(state_bytes + checkpoints.METADATA_BYTES)
                             * (train_config.keep_checkpoints + 2))
  parallel.sync('workdir ready')

  train_fn = jax.jit(functools.partial(guarded_step, step_fn=task.train_step,
                                       on_nonfinite=train_config.on_nonfinite),
                     donate_argnums=(0, 1, 2) if donates_state() else (1, 2),
                     out_shardings=parallel.replicated())
  eval_fn = jax.jit(task.eval_step, out_shardings=parallel.replicated())
  batch_size = train_config.batch_size
  steps_per_epoch = len(splits.train) // batch_size
  train_data, val_data, test_data = map(pipeline.to_device, splits)
  best_checkpoints, latest_checkpoints = checkpoints.managers(workdir,
                                                              train_config.keep_checkpoints)

  _, metric_shapes = jax.eval_shape(task.train_step, state,
                                    _batch_spec(splits.train, batch_size), task.train_key)
  metric_names = sorted(metric_shapes)
  zero_sums = lambda: parallel.replicate(
      {name: np.zeros((), np.float32) for name in [*metric_names, 'steps']})
  sums = zero_sums()
  health = parallel.replicate({name: np.array(value, np.int32) for name, value in HEALTHY.items()})
  position = {'epoch': 1, 'step': 0, 'best_loss': float('inf'), 'best_epoch': 0}
  restored = checkpoints.restore_latest(
      latest_checkpoints, {'state': state, 'sums': sums, 'health': health}) if resume else None
  if restored:
    (tree, position) = restored
    state, sums, health = tree['state'], tree['sums'], tree['health']
    print(f'resuming at epoch {position["epoch"]}, step {position["step"]}')

  def save_latest(epoch, step):
    _check_health(health, metric_names, workdir, train_config.on_nonfinite)
    checkpoints.save_latest(
        latest_checkpoints, (epoch - 1) * steps_per_epoch + step,
        {'state': state, 'sums': sums, 'health': health},
        dict(position, epoch=epoch, step=step))

  every = train_config.checkpoint_every_steps
  try:
    with contextlib.ExitStack() as stack:
      stop = stack.enter_context(_StopSignal())
      if writes:  # only process 0 writes files
        history = stack.enter_context(workdir_lib.History(workdir, position['epoch']))
      writer = stack.enter_context(events.EventWriter(
          workdir, task.grid, first_epoch=position['epoch'], enabled=writes))
      for epoch in range(position['epoch'], train_config.num_epochs + 1):
        start = time.perf_counter()
        first_step = position['step'] if epoch == position['epoch'] else 0
        order = pipeline.epoch_order(config.seed, epoch, len(splits.train), batch_size)[first_step:]
        batches = pipeline.batches(train_data, order, num_workers)
        for step, batch in enumerate(tqdm.tqdm(batches, total=len(order), desc=f'epoch {epoch}',
                                               leave=False, disable=None, file=sys.stderr),
                                     start=first_step + 1):
          state, sums, health = train_fn(state, sums, health, batch, task.train_key)
          if step == first_step + 1:  # the first step may have compiled: time the rest
            timed_from = time.perf_counter()
          due = every and step < steps_per_epoch and ((epoch - 1) * steps_per_epoch + step) % every == 0
          stopping = stop.requested(step)
          if stopping or due:
            save_latest(epoch, step)
          if stopping:
            raise UserError(f'stopped by {stop.received or "a signal to another process"} at epoch '
                            f'{epoch}, step {step}: the state is checkpointed in {workdir}/'
                            'checkpoints; rerun the same command to resume')
        host_health = _check_health(health, metric_names, workdir, train_config.on_nonfinite)
        totals = jax.device_get(sums)
        train_metrics = {name: float(totals[name] / max(totals['steps'], 1))
                         for name in metric_names}
        end = time.perf_counter()
        seconds = end - start
        throughput = {'images_per_s': (len(order) - 1) * batch_size / (end - timed_from)
                      } if len(order) > 1 else {}
        val_metrics = evaluate(eval_fn, state, val_data, batch_size, task.eval_key, num_workers,
                               task.eval_metrics)
        extras = {group: {name: float(value) for name, value in values.items()}
                  for group, values in jax.device_get(task.extras(state)).items()}
        record = {'epoch': epoch,
                  **{f'train/{k}': v for k, v in train_metrics.items()},
                  **{f'val/{k}': v for k, v in val_metrics.items()},
                  **{f'{group}/{k}': v for group, values in extras.items() for k, v in values.items()},
                  'skipped_steps': int(host_health['skipped']),
                  'seconds': seconds, **throughput}
        if writes:
          history.append(record)
        writer.write(record, state)
        if val_metrics[task.objective] < position['best_loss']:
          position.update(best_loss=val_metrics[task.objective], best_epoch=epoch)
          checkpoints.save_best(best_checkpoints, epoch, state)
        sums = zero_sums()
        save_latest(epoch + 1, 0)
        print(f'epoch {epoch}: ' + ' | '.join([
            f'train {format_metrics(train_metrics)}', f'val {format_metrics(val_metrics)}',
            *(f'{group} {format_metrics(values)}' for group, values in extras.items()),
            *(f'{rate:.0f} images/s' for rate in throughput.values())]), flush=True)
  finally:  # an exception must not lose a checkpoint still being written
    checkpoints.finish(best_checkpoints)
    checkpoints.finish(latest_checkpoints)

  if not position['best_epoch']:
    raise UserError(f'no epoch had a finite validation {task.objective}, so there is no best '
                    f'checkpoint to test: lower train.learning_rate, or check the data')
  state = checkpoints.restore_best(best_checkpoints, state, position['best_epoch'])
  test_metrics = evaluate(eval_fn, state, test_data, batch_size, task.eval_key, num_workers,
                          task.eval_metrics)
  print(f'test (best epoch {position["best_epoch"]}): {format_metrics(test_metrics)}')
  result = summarize(test_metrics, position['best_epoch'], position['best_loss'])
  if writes:
    workdir_lib.write_json(workdir / workdir_lib.METRICS, result)
  return result
