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
import dataclasses
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


# glibc's largest mmap threshold: it maps a buffer above it fresh from the kernel at every
# allocation, so a new state of such buffers page-faults all of its memory each step.
MMAP_THRESHOLD_BYTES = 32 * 2**20


def donates_state(state):
  """Whether the jitted train steps donate `state` (params, optimizer state) to its update.

  On accelerators, yes: one copy of the state in memory. On CPUs, only for a
  state with a leaf above MMAP_THRESHOLD_BYTES (a dense conditioning layer on
  large images): there XLA copies each donated parameter that an input
  gradient still reads once the parameter's own update is ready, slower
  than writing a small state to fresh memory but faster than faulting in
  fresh pages for a large one.
  """
  return jax.default_backend() != 'cpu' or any(
      leaf.nbytes > MMAP_THRESHOLD_BYTES for leaf in jax.tree.leaves(state))


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


class _Setup(NamedTuple):
  """What every epoch of a run shares: compiled steps, device data, checkpoint managers."""
  task: Task
  config: Any
  workdir: pathlib.Path
  writes: bool  # whether this process writes files (process 0)
  train_fn: Callable  # jitted guarded_step
  eval_fn: Callable  # jitted task.eval_step
  data: tuple  # the train, validation and test splits on the device (pipeline.to_device)
  best: Any  # checkpoint managers: the best epoch's, the latest states'
  latest: Any
  metric_names: list
  steps_per_epoch: int
  num_workers: int


@dataclasses.dataclass
class _Carry:
  """What training updates as it goes; the latest checkpoint holds all of it."""
  state: Any
  sums: dict  # {metric: ()} summed over the epoch's steps so far, and 'steps'
  health: dict  # HEALTHY's keys
  position: dict  # epoch and step where the run (re)started, best_loss, best_epoch

  def tree(self):
    return {'state': self.state, 'sums': self.sums, 'health': self.health}


def _open_workdir(config, workdir, state):
  """Whether `workdir` holds a run to resume; process 0 then creates or checks it, sized for
  the checkpoints of `state` (workdir.init_workdir)."""
  resume = (workdir / workdir_lib.CONFIG).exists()
  parallel.sync('workdir read')  # by every process, before process 0 changes it
  if parallel.is_writer():
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    workdir_lib.init_workdir(config, workdir, resume,
                             needed_bytes=(state_bytes + checkpoints.METADATA_BYTES)
                             * (config.train.keep_checkpoints + 2))
  parallel.sync('workdir ready')
  return resume


def _set_up(task, config, workdir, num_workers):
  """Jits the steps, puts the splits on the device and opens the checkpoint managers."""
  train_config = config.train
  train_fn = jax.jit(functools.partial(guarded_step, step_fn=task.train_step,
                                       on_nonfinite=train_config.on_nonfinite),
                     donate_argnums=(0, 1, 2) if donates_state(task.state) else (1, 2),
                     out_shardings=parallel.replicated())
  eval_fn = jax.jit(task.eval_step, out_shardings=parallel.replicated())
  _, metric_shapes = jax.eval_shape(task.train_step, task.state,
                                    _batch_spec(task.splits.train, train_config.batch_size),
                                    task.train_key)
  best, latest = checkpoints.managers(workdir, train_config.keep_checkpoints)
  return _Setup(task, config, workdir, parallel.is_writer(), train_fn, eval_fn,
                tuple(map(pipeline.to_device, task.splits)), best, latest, sorted(metric_shapes),
                len(task.splits.train) // train_config.batch_size, num_workers)


def _zero_sums(metric_names):
  return parallel.replicate({name: np.zeros((), np.float32) for name in [*metric_names, 'steps']})


def _start(setup, resume):
  """The carry of a new run, or the latest checkpoint's when it resumes."""
  carry = _Carry(setup.task.state, _zero_sums(setup.metric_names),
                 parallel.replicate({name: np.array(value, np.int32)
                                     for name, value in HEALTHY.items()}),
                 {'epoch': 1, 'step': 0, 'best_loss': float('inf'), 'best_epoch': 0})
  restored = checkpoints.restore_latest(setup.latest, carry.tree()) if resume else None
  if restored:
    tree, position = restored
    carry = _Carry(tree['state'], tree['sums'], tree['health'], position)
    print(f'resuming at epoch {position["epoch"]}, step {position["step"]}')
  return carry


def _save_latest(setup, carry, epoch, step):
  """Checks the health ('stop' mode), then checkpoints `carry` as at step `step` of `epoch`."""
  _check_health(carry.health, setup.metric_names, setup.workdir, setup.config.train.on_nonfinite)
  checkpoints.save_latest(setup.latest, (epoch - 1) * setup.steps_per_epoch + step, carry.tree(),
                          dict(carry.position, epoch=epoch, step=step))


def _train_epoch(setup, carry, epoch, stop):
  """Trains epoch `epoch` (from the step where the run resumed); returns its train metrics and
  {'images_per_s'} (absent for a single step). Checkpoints every checkpoint_every_steps, and
  raises UserError after checkpointing when `stop` is requested."""
  train_config, position = setup.config.train, carry.position
  batch_size, every = train_config.batch_size, train_config.checkpoint_every_steps
  first_step = position['step'] if epoch == position['epoch'] else 0
  order = pipeline.epoch_order(setup.config.seed, epoch, len(setup.task.splits.train),
                               batch_size)[first_step:]
  batches = pipeline.batches(setup.data[0], order, setup.num_workers)
  for step, batch in enumerate(tqdm.tqdm(batches, total=len(order), desc=f'epoch {epoch}',
                                         leave=False, disable=None, file=sys.stderr),
                               start=first_step + 1):
    carry.state, carry.sums, carry.health = setup.train_fn(
        carry.state, carry.sums, carry.health, batch, setup.task.train_key)
    if step == first_step + 1:  # the first step may have compiled: time the rest
      timed_from = time.perf_counter()
    due = every and step < setup.steps_per_epoch and (
        (epoch - 1) * setup.steps_per_epoch + step) % every == 0
    stopping = stop.requested(step)
    if stopping or due:
      _save_latest(setup, carry, epoch, step)
    if stopping:
      raise UserError(f'stopped by {stop.received or "a signal to another process"} at epoch '
                      f'{epoch}, step {step}: the state is checkpointed in {setup.workdir}/'
                      'checkpoints; rerun the same command to resume')
  totals = jax.device_get(carry.sums)
  metrics = {name: float(totals[name] / max(totals['steps'], 1)) for name in setup.metric_names}
  throughput = {'images_per_s': (len(order) - 1) * batch_size / (time.perf_counter() - timed_from)
                } if len(order) > 1 else {}
  return metrics, throughput


def _end_epoch(setup, carry, epoch, train_metrics, timing, writer, history):
  """Validates epoch `epoch`, writes its record (history.jsonl, TensorBoard) of the metrics and
  `timing` {'seconds', 'images_per_s'?}, keeps the best checkpoint and the latest one, and prints
  the epoch's line."""
  task = setup.task
  host_health = _check_health(carry.health, setup.metric_names, setup.workdir,
                              setup.config.train.on_nonfinite)
  val_metrics = evaluate(setup.eval_fn, carry.state, setup.data[1],
                         setup.config.train.batch_size, task.eval_key, setup.num_workers,
                         task.eval_metrics)
  extras = {group: {name: float(value) for name, value in values.items()}
            for group, values in jax.device_get(task.extras(carry.state)).items()}
  record = {'epoch': epoch,
            **{f'train/{k}': v for k, v in train_metrics.items()},
            **{f'val/{k}': v for k, v in val_metrics.items()},
            **{f'{group}/{k}': v for group, values in extras.items() for k, v in values.items()},
            'skipped_steps': int(host_health['skipped']), **timing}
  if history is not None:
    history.append(record)
  writer.write(record, carry.state)
  if val_metrics[task.objective] < carry.position['best_loss']:
    carry.position.update(best_loss=val_metrics[task.objective], best_epoch=epoch)
    checkpoints.save_best(setup.best, epoch, carry.state)
  carry.sums = _zero_sums(setup.metric_names)
  _save_latest(setup, carry, epoch + 1, 0)
  print(f'epoch {epoch}: ' + ' | '.join([
      f'train {format_metrics(train_metrics)}', f'val {format_metrics(val_metrics)}',
      *(f'{group} {format_metrics(values)}' for group, values in extras.items()),
      *(f'{rate:.0f} images/s' for name, rate in timing.items() if name == 'images_per_s')]),
        flush=True)


def _train(setup, carry):
  """The epochs from carry.position's to config.train.num_epochs; checkpoints are complete on
  disk when it returns or raises."""
  try:
    with contextlib.ExitStack() as stack:
      stop = stack.enter_context(_StopSignal())
      history = (stack.enter_context(workdir_lib.History(setup.workdir, carry.position['epoch']))
                 if setup.writes else None)  # only process 0 writes files
      writer = stack.enter_context(events.EventWriter(
          setup.workdir, setup.task.grid, first_epoch=carry.position['epoch'],
          enabled=setup.writes))
      for epoch in range(carry.position['epoch'], setup.config.train.num_epochs + 1):
        start = time.perf_counter()
        train_metrics, throughput = _train_epoch(setup, carry, epoch, stop)
        timing = {'seconds': time.perf_counter() - start, **throughput}
        _end_epoch(setup, carry, epoch, train_metrics, timing, writer, history)
  finally:  # an exception must not lose a checkpoint still being written
    checkpoints.finish(setup.best)
    checkpoints.finish(setup.latest)


def _test(setup, carry, summarize):
  """The content of metrics.json: the test metrics of the best checkpoint, written by process 0."""
  position, task = carry.position, setup.task
  if not position['best_epoch']:
    raise UserError(f'no epoch had a finite validation {task.objective}, so there is no best '
                    f'checkpoint to test: lower train.learning_rate, or check the data')
  state = checkpoints.restore_best(setup.best, carry.state, position['best_epoch'])
  test_metrics = evaluate(setup.eval_fn, state, setup.data[2], setup.config.train.batch_size,
                          task.eval_key, setup.num_workers, task.eval_metrics)
  print(f'test (best epoch {position["best_epoch"]}): {format_metrics(test_metrics)}')
  result = summarize(test_metrics, position['best_epoch'], position['best_loss'])
  if setup.writes:
    workdir_lib.write_json(setup.workdir / workdir_lib.METRICS, result)
  return result


def fit(task, config, workdir, summarize, num_workers=0) -> dict:
  """Trains `task` by config.train (and config.seed) in `workdir`; returns its metrics.json.

  summarize(test metrics, best epoch, its validation objective) -> the
  content of metrics.json. num_workers: processes that decode a streamed
  split (data.pipeline). The caller holds the workdir's lock
  (workdir.writer_lock). Installs SIGTERM/SIGINT handlers while it trains.
  Raises UserError for a workdir that cannot be written, a non-finite metric
  ('stop' mode) or SIGTERM/SIGINT (after checkpointing).
  """
  workdir = pathlib.Path(workdir).absolute()
  resume = _open_workdir(config, workdir, task.state)
  setup = _set_up(task, config, workdir, num_workers)
  carry = _start(setup, resume)
  _train(setup, carry)
  return _test(setup, carry, summarize)
