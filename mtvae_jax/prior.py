"""Stage 2 of the VQ-VAE (thesis 2.2.2): a gated PixelCNN prior over the frozen encoder's codes.

The prior is fit by maximum likelihood to the codes of the training split,
keeps the epoch with the best validation likelihood, and is scored on the test
codes in bits per code, the mean of -log2 p(c_i | earlier codes) over all
positions, next to two baselines on the same codes: uniform, log2 K, and
unigram, the code frequencies of the training split (add-one smoothed, so a
code unseen in training costs finitely many bits).

The prior trains in the VAE's loop (loop.py), so it resumes, checkpoints on
SIGTERM/SIGINT and writes from one process alike. A VQ run's directory
receives prior/, a work directory (workdir.py) with:
  config.json     the prior's config
  history.jsonl   one line per epoch: train/ and val/ bits_per_code, skipped_steps,
                  seconds, images_per_s (code grids per second, timed as train.py's)
  events.out.tfevents.*  the same scalars, for TensorBoard
  checkpoints/best/    orbax checkpoint of the best epoch by validation bits per code
  checkpoints/latest/  the last few full training states, for resuming
  metrics.json    test_bits_per_code, uniform_bits_per_code, unigram_bits_per_code,
                  best_epoch, best_val_bits_per_code, num_params
"""
import functools
import pathlib
from typing import Any

from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mtvae_jax import checkpoints
from mtvae_jax import config as config_lib
from mtvae_jax import loop
from mtvae_jax import parallel
from mtvae_jax import train
from mtvae_jax import workdir as workdir_lib
from mtvae_jax.errors import UserError
from mtvae_jax.models import pixelcnn

PRIOR_DIR = 'prior'


def default_config():
  """The prior's hyperparameters (configs/prior.py)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.pixelcnn = ml_collections.ConfigDict(dict(features=64, num_layers=6, kernel_size=3))
  config.train = config_lib.train_config(num_epochs=30)
  return config


RULES = {  # config_lib.check's rules
    'pixelcnn.features': config_lib.COUNT,
    'pixelcnn.num_layers': config_lib.COUNT,
    'pixelcnn.kernel_size': ((lambda value: value >= 3 and value % 2 == 1),
                             'use an odd integer >= 3'),
    **config_lib.TRAIN_RULES,
}


def validate(config):
  """Raises UserError naming the first key of the prior config with a bad value."""
  config_lib.check(config, RULES)


def build_prior(config, num_codes):
  return pixelcnn.GatedPixelCNN(num_codes=num_codes, **config.pixelcnn)


class PriorState(train_state.TrainState):
  batch_stats: Any  # always {}: the PixelCNN has no batch norm; kept for the checkpoint helpers


def create_prior_state(config, model, grid, key):
  """Prior parameters for (h, w) code grids, with AdamW; built in jit and replicated on every
  device like the VAE's state."""
  tx = optax.adamw(config.train.learning_rate, weight_decay=config.train.weight_decay)

  def init(key):
    params = model.init(key, jnp.zeros((1, *grid), jnp.int32))['params']
    return PriorState.create(apply_fn=model.apply, params=params, tx=tx,
                             batch_stats={}).replace(step=jnp.int32(0))

  return parallel.initialise(init, key)


def check_checkpoint(workdir, what, hint, again):
  """UserError, creating nothing, unless `workdir` holds metrics.json (else `hint`) and a best
  checkpoint (else `again`)."""
  workdir_lib.check_finished(workdir, what, hint)
  best = pathlib.Path(workdir) / 'checkpoints' / 'best'
  if not (best.is_dir() and any(path.name.isdigit() for path in best.iterdir())):
    raise UserError(f"workdir '{workdir}' holds the metrics.json of a {what} but no checkpoint "
                    f"(checkpoints/best/ is missing or empty): {again}")


def check_run(workdir):
  """UserError, before anything is loaded or created, unless `workdir` holds a finished run of
  experiments.main with its best checkpoint; names a prior's folder given in its place."""
  workdir = pathlib.Path(workdir)
  if (workdir / workdir_lib.CONFIG).is_file():
    stored = workdir_lib.read_json(workdir / workdir_lib.CONFIG)
    if not isinstance(stored, dict) or 'model' not in stored:
      prior_like = isinstance(stored, dict) and 'pixelcnn' in stored
      raise UserError(
          f"workdir '{workdir}' is the folder of a PixelCNN prior: give its VQ-VAE run's folder, "
          f"--workdir={workdir.parent}" if prior_like else
          f"'{workdir / workdir_lib.CONFIG}' holds no model: give the folder of a run of "
          'experiments.main')
  check_checkpoint(workdir, 'finished run', 'train it first with experiments.main',
                   'train the run again into another --workdir')


def vq_run_config(workdir):
  """The config of the finished VQ-VAE run of `workdir`; any other model is a UserError."""
  check_run(workdir)
  config = workdir_lib.load_config(workdir)
  if config.model != 'vq':
    raise UserError(f"workdir '{workdir}' holds a run of model={config.model}: the prior is "
                    'learned over the codes of a VQ-VAE run (model=vq)')
  return config


@functools.partial(jax.jit, static_argnames=('model', 'method'))
def _apply(model, variables, *args, method):
  return model.apply(variables, *args, method=method)


def apply_model(run, method, *args):
  """run.model.<method>(*args) with the run's parameters and statistics, jitted."""
  variables = {'params': run.state.params, 'batch_stats': run.state.batch_stats}
  return _apply(run.model, variables, *args, method=method)


def code_grid(run):
  """(h, w) of the run's code grid."""
  images = jax.ShapeDtypeStruct((1, *run.splits.train.shape[1:]), jnp.float32)
  return jax.eval_shape(lambda x: apply_model(run, 'codes', x), images).shape[1:]


def encode_codes(run, images, batch_size):
  """(N, H, W, C) images -> (N, h, w) int32 codes of the run's frozen encoder."""
  codes = [apply_model(run, 'codes', batch)
           for batch, _ in loop.padded_batches(images, batch_size)]
  return np.concatenate(jax.device_get(codes))[:len(images)]


def bits_per_code(logits, codes):
  """Logits (B, h, w, K) and codes (B, h, w) -> (B,) mean -log2 p(code) over each grid."""
  nats = optax.softmax_cross_entropy_with_integer_labels(logits, codes)
  return jnp.mean(nats, axis=(1, 2)) / jnp.log(2.0)


def uniform_bits_per_code(num_codes):
  return float(np.log2(num_codes))


def unigram_bits_per_code(train_codes, test_codes, num_codes):
  """Mean -log2 q(c) over `test_codes`, q the add-one smoothed frequencies of `train_codes`."""
  counts = np.bincount(np.ravel(train_codes), minlength=num_codes) + 1.0
  return float(-np.mean(np.log2(counts / counts.sum())[test_codes]))


def prior_train_step(state, codes, key):
  """One AdamW step on codes (B, h, w); returns the state and the batch's {'bits_per_code'}."""
  del key  # the prior's likelihood is deterministic
  def loss_fn(params):
    return jnp.mean(bits_per_code(state.apply_fn({'params': params}, codes), codes))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), {'bits_per_code': loss}


def prior_eval_step(state, codes, weights, key):
  """Sum over the batch of bits per code, weighted by `weights` (B,) (0 for padding)."""
  del key  # the prior's likelihood is deterministic
  bits = bits_per_code(state.apply_fn({'params': state.params}, codes), codes)
  return {'bits_per_code': jnp.sum(weights * bits)}


def sampler(model):
  """jit of pixelcnn.sample for `model`: (params, key, (B, h, w), temperature) -> codes."""
  return jax.jit(functools.partial(pixelcnn.sample, model), static_argnames='shape')


def train_prior(config, workdir) -> dict:
  """Trains the prior of the VQ run in `workdir` into <workdir>/prior/; returns its metrics.

  A prior/ holding a finished prior of the same config is kept and its
  metrics returned; one of an unfinished prior of the same config is resumed.
  prior/'s lock (workdir.writer_lock) is held from the start. Raises
  UserError for a bad config, a missing or unfinished run, a run of another
  model, a prior/ in use or of another config, a non-finite loss or
  SIGTERM/SIGINT (after checkpointing).
  """
  validate(config)
  parallel.initialize(vq_run_config(workdir).distributed)
  prior_dir = pathlib.Path(workdir).absolute() / PRIOR_DIR
  with workdir_lib.writer_lock(prior_dir):
    finished = workdir_lib.finished_run(config, prior_dir)
    if finished is not None:
      print(f'{prior_dir} holds a finished prior of this config; its metrics.json is kept: '
            f'{loop.format_metrics(finished)}')
      return finished
    return _train_prior(config, train.load_run(workdir), prior_dir)


def _train_prior(config, run, prior_dir):
  """train_prior's training over the codes of the VQ-VAE `run`, prior_dir's lock held."""
  config_lib.check(config, {'train.batch_size': config_lib.batch_fits(len(run.splits.train))})
  codes = run.splits._make(encode_codes(run, images, config.train.batch_size)
                           for images in run.splits)
  num_codes = run.config.vq.num_embeddings
  model = build_prior(config, num_codes)
  init_key, eval_key = jax.random.split(jax.random.key(config.seed))
  state = create_prior_state(config, model, codes.train.shape[1:], init_key)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f'PixelCNN prior: {num_params:,} parameters; {num_codes} codes on a '
        f'{codes.train.shape[1:]} grid; {len(codes.train)} train, '
        f'{len(codes.validation)} validation, {len(codes.test)} test grids')

  def summarize(test_metrics, best_epoch, best_bits):
    return {'test_bits_per_code': test_metrics['bits_per_code'],
            'uniform_bits_per_code': uniform_bits_per_code(num_codes),
            'unigram_bits_per_code': unigram_bits_per_code(codes.train, codes.test, num_codes),
            'best_epoch': best_epoch, 'best_val_bits_per_code': best_bits,
            'num_params': int(num_params)}

  task = loop.Task(state=state, train_step=prior_train_step, eval_step=prior_eval_step,
                   splits=codes, train_key=eval_key, eval_key=eval_key,
                   objective='bits_per_code')
  result = loop.fit(task, config, prior_dir, summarize)
  print(f'test bits per code (best epoch {result["best_epoch"]}): prior '
        f'{result["test_bits_per_code"]:.4f} | unigram {result["unigram_bits_per_code"]:.4f} '
        f'| uniform {result["uniform_bits_per_code"]:.4f}')
  return result


def load_prior(workdir, run):
  """(model, state) of the trained prior in <workdir>/prior/, restored from its best checkpoint."""
  prior_dir = pathlib.Path(workdir).absolute() / PRIOR_DIR
  check_checkpoint(prior_dir, 'trained prior',
                   f'run python -m experiments.prior --workdir={workdir} first',
                   f'remove {prior_dir} and run python -m experiments.prior --workdir={workdir}')
  again = f'remove {prior_dir} and run python -m experiments.prior --workdir={workdir}'
  path = prior_dir / workdir_lib.CONFIG
  if not path.is_file():
    raise UserError(f"'{path}' is missing, so the prior cannot be rebuilt: {again}")
  stored = workdir_lib.read_json(path)
  config = default_config()
  try:
    config.update(stored)
    model = build_prior(config, run.config.vq.num_embeddings)
    state = create_prior_state(config, model, code_grid(run), jax.random.key(config.seed))
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise UserError(f"'{path}' does not describe a prior ({type(e).__name__}: {e}): "
                    f'{again}') from None
  best_checkpoint, _ = checkpoints.managers(prior_dir, keep_latest=1)
  return model, checkpoints.restore_best(best_checkpoint, state)
