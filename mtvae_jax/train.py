"""The VAE's training: config -> data -> model -> train state -> jitted steps -> loop.fit.

The run's work directory (workdir.py) receives:
  config.json     the config, resolved for the loaded images (mask.num_pixels)
  history.jsonl   one line per epoch: train/ and val/ metrics, weights/, skipped_steps,
                  seconds (of training, compiling included), images_per_s (training images
                  per second from the end of the epoch's first step, which compiles in the
                  first epoch a process runs; absent from an epoch of a single step)
  events.out.tfevents.*  the same scalars and an image grid now and then, for TensorBoard
  checkpoints/best/    orbax checkpoint of the best epoch by validation loss
  checkpoints/latest/  the last few full training states, for resuming
  metrics.json    test metrics of the best checkpoint
"""
import functools
import pathlib
from typing import Any, NamedTuple

from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mtvae_jax import balancing
from mtvae_jax import checkpoints
from mtvae_jax import config as config_lib
from mtvae_jax import data
from mtvae_jax import diagnostics
from mtvae_jax import events
from mtvae_jax import loop
from mtvae_jax import losses
from mtvae_jax import methods
from mtvae_jax import models
from mtvae_jax import parallel
from mtvae_jax import workdir as workdir_lib


class TrainState(train_state.TrainState):
  batch_stats: Any
  balancing: balancing.State


def create_train_state(config, model, image_shape, key):
  """Parameters, batch-norm statistics and loss-balancing state from `key`, with AdamW.

  Built inside jit so that every leaf is a device array of fixed dtype,
  replicated on every device, as a restored checkpoint's are: the train step
  then compiles once, and a resumed run reuses the compiled program of a
  fresh one.
  """
  height, width, channels = image_shape
  images = jnp.zeros((1, height, width, channels))
  m = jnp.zeros((1, height, width, channels + 1))
  conds = methods.decoder_inputs(methods.of(config).evaluate, lambda: m)  # every decoder
  tx = optax.adamw(config.train.learning_rate, weight_decay=config.train.weight_decay)

  def init(key):
    init_key, z_key = jax.random.split(key)
    variables = model.init(init_key, images, conds, z_key, train=False)
    return TrainState.create(apply_fn=model.apply, params=variables['params'],
                             batch_stats=variables.get('batch_stats', {}), tx=tx,
                             balancing=balancing.init(config)).replace(step=jnp.int32(0))

  return parallel.initialise(init, key)


def loss_terms(state, params, images, conds, key, train):
  """Per-example loss terms {name: (B,)} and the new batch-norm statistics."""
  (outputs, terms), updates = state.apply_fn(
      models.variables(state, params), images, conds, key, train=train, mutable=['batch_stats'])
  terms = dict(terms, **{name: losses.mse(images, out) for name, out in outputs.items()})
  return terms, updates['batch_stats']


def train_step(state, images, base_key, *, config):
  """One AdamW step on a batch (B, H, W, C); masks are drawn fresh per image.

  The loss weights are those in state.balancing, which the step then updates.
  """
  key = jax.random.fold_in(base_key, state.step)
  mask_key, z_key = jax.random.split(key)
  conds = methods.train_conds(config, images, mask_key)

  def loss_fn(params):
    terms, batch_stats = loss_terms(state, params, images, conds, z_key, train=True)
    means = {name: jnp.mean(value) for name, value in terms.items()}
    loss = losses.weighted_sum(means, state.balancing.weights)
    return loss, (means, batch_stats)

  (loss, (means, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats,
                                balancing=balancing.update(state.balancing, means, config))
  return state, dict(_metric_names(means), loss=loss)


def eval_step(state, images, weights, key, *, config):
  """Sums over the batch of each term, weighted by `weights` (B,) (0 for padding), and the
  sums behind the diagnostics (`diagnostic_sums`)."""
  mask_key, z_key = jax.random.split(key)
  conds = methods.eval_conds(config, images, mask_key)
  terms, _ = loss_terms(state, state.params, images, conds, z_key, train=False)
  terms['loss'] = losses.weighted_sum(terms, dict(config.loss.weights))
  sums = {name: jnp.sum(value * weights) for name, value in _metric_names(terms).items()}
  return dict(sums, **diagnostic_sums(state, images, conds, z_key, weights, config=config))


def _code_counts(apply, images, weights, config):
  """A VQ-VAE's use of its codebook: {'code_counts': (K,)}."""
  return {'code_counts': diagnostics.code_counts(apply(images, method='codes'),
                                                 config.vq.num_embeddings, weights)}


def _latent_sums(apply, images, weights, config):
  """A Gaussian VAE's posterior means, for its active units: {'latent_sums': {...}}."""
  del config
  return {'latent_sums': diagnostics.latent_sums(apply(images, method='posterior_mean'), weights)}


# config.model -> the weighted sums behind its latent's diagnostics, fn(apply, images, weights,
# config) -> {name: sums}.
LATENT_SUMS = {'gaussian': _latent_sums, 'vq': _code_counts}


def diagnostic_sums(state, images, conds, z_key, weights, *, config):
  """Sums over the batch, weighted by `weights` (B,), from which `diagnostic_metrics` computes
  the diagnostics (diagnostics.py).

  'code_counts' (K,) of a VQ-VAE's codes, or 'latent_sums' of a Gaussian VAE's
  posterior means; with a conditioned decoder also 'z_use_errors', its errors
  {'own', 'other'} given the z of eval_step's loss terms (same `z_key`) and
  given another image's z.
  """
  apply = functools.partial(state.apply_fn, models.variables(state))
  sums = LATENT_SUMS[config.model](apply, images, weights, config)
  # XLA merges the encoder passes and the decode with the own z with the loss terms' equal
  # ones: the diagnostics add one decode, with the other z.
  m = conds.get('recon_cond')
  if m is not None:
    z, _ = apply(images, z_key, train=False, method='encode')
    errors = diagnostics.z_use_errors(lambda z, m: apply(z, m, method='decode'), z, m, images)
    sums['z_use_errors'] = {name: jnp.sum(error * weights)
                            for name, error in zip(('own', 'other'), errors)}
  return sums


def diagnostic_metrics(means):
  """eval_step's sums averaged over a split -> the same metrics with the diagnostic sums
  replaced by codebook_perplexity and codes_used (VQ-VAE) or active_units (Gaussian VAE), and
  z_use (conditioned decoder)."""
  means = dict(means)
  if 'code_counts' in means:
    counts = means.pop('code_counts')
    means.update(codebook_perplexity=diagnostics.perplexity(counts),
                 codes_used=diagnostics.codes_used(counts))
  if 'latent_sums' in means:
    means['active_units'] = diagnostics.active_units(means.pop('latent_sums'))
  if 'z_use_errors' in means:
    errors = means.pop('z_use_errors')
    means['z_use'] = diagnostics.z_use(errors['own'], errors['other'])
  return means


def _metric_names(terms):
  return {name if name == 'loss' else f'{name}_loss': value for name, value in terms.items()}


class Run(NamedTuple):
  """What a config sets up: data, model, initial train state and random keys."""
  config: ml_collections.ConfigDict
  splits: data.Splits
  model: Any
  state: TrainState
  train_key: jax.Array
  eval_key: jax.Array


def load_data(config):
  """(config, splits): the data of a validated config, and the config resolved for its images
  (config_lib.resolve_for_images) and checked against them."""
  parallel.initialize(config.distributed)
  parallel.check_batch_size(config.train.batch_size)
  splits = data.load(config.data, config.seed)
  config = config_lib.resolve_for_images(config, splits.train.shape[1:])
  config_lib.validate_for_data(config, splits)
  return config, splits


def setup(config) -> Run:
  """Data, model and initial state for a validated config (deterministic by config.seed).

  Run.config is the config resolved for the loaded images (load_data).
  """
  return build_run(*load_data(config))


def build_run(config, splits) -> Run:
  """Model and initial state for `config` and its `splits` (load_data).

  The state and keys are replicated on every device; the batch size must
  split evenly over the devices.
  """
  image_shape = splits.train.shape[1:]
  model = models.build_model(config, image_shape)
  keys = jax.jit(lambda: jax.random.split(jax.random.key(config.seed), 3),
                 out_shardings=parallel.replicated())()
  state = create_train_state(config, model, image_shape, keys[0])
  return Run(config, splits, model, state, keys[1], keys[2])


def load_run(workdir) -> Run:
  """The finished run in `workdir`, its state restored from the best checkpoint."""
  run = setup(workdir_lib.load_config(workdir))
  best, _ = checkpoints.managers(workdir, keep_latest=1)
  return run._replace(state=checkpoints.restore_best(best, run.state))


def train_and_evaluate(config, workdir) -> dict:
  """Trains config's model, keeps the best epoch by validation loss, returns its test metrics.

  Writes config.json (the config resolved for the loaded images), history.jsonl,
  checkpoints/ and metrics.json into `workdir`, holding its lock
  (workdir.writer_lock) from the start. Rerunning on the workdir of an
  unfinished run of the same config resumes it from its latest checkpoint and
  ends with the same metrics as an uninterrupted run (loop.fit). Raises
  UserError for a bad config, a workdir in use or of another config, bad
  data, a non-finite loss ('stop' mode) or SIGTERM/SIGINT (after
  checkpointing).
  """
  config_lib.validate(config)
  parallel.initialize(config.distributed)
  workdir = pathlib.Path(workdir).absolute()
  with workdir_lib.writer_lock(workdir):
    config, splits = load_data(config)
    finished = workdir_lib.finished_run(config, workdir)
    if finished is not None:
      print(f'{workdir} holds a finished run of this config; its metrics.json is kept: '
            f'{loop.format_metrics(finished)}')
      return finished
    return _train(build_run(config, splits), workdir)


def _train(run, workdir):
  """train_and_evaluate's training of a new or unfinished `run`, the workdir's lock held."""
  config, splits = run.config, run.splits
  num_params = sum(x.size for x in jax.tree.leaves(run.state.params))
  print(f'{config.model} VAE, method {config.method}: {num_params:,} parameters; data '
        f'{config.data.name} {splits.train.shape[1:]}: {len(splits.train)} train, '
        f'{len(splits.validation)} validation, {len(splits.test)} test images')
  task = loop.Task(
      state=run.state, train_step=functools.partial(train_step, config=config),
      eval_step=functools.partial(eval_step, config=config),
      eval_metrics=diagnostic_metrics, splits=splits,
      train_key=run.train_key, eval_key=run.eval_key, objective='loss',
      extras=lambda state: {'weights': state.balancing.weights},
      grid=events.reconstruction_grid(functools.partial(methods.eval_conds, config),
                                      splits.validation, run.eval_key))
  return loop.fit(task, config, workdir, lambda test, best_epoch, best_loss: dict(
      test, best_epoch=best_epoch, best_val_loss=best_loss, num_params=int(num_params)),
                  config.data.num_workers)
