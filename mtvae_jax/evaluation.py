"""Analyses of a finished run, written into its work directory by `evaluate_run`.

  curve.json        sparse-reconstruction curve (multi, single): test MSE of the
                    conditioned decoder against the number of observed pixels,
                    0 up to all, for each sampling type; beside the model's own
                    unconditioned MSE and, with a baseline run, the baseline's
  uncertainty.json  completions from the prior given only the evaluation mask's
                    pixels (multi, single; a VQ run needs its trained prior):
                    over the pixels the mask hides, the MSE and absolute error of
                    the completions' per-pixel mean, their mean std, the fraction
                    of true pixels inside mean ± 2 std and the correlation of the
                    std with the absolute error
  figures/          reconstructions.png, losses.png, sampling_types.png,
                    curve.png, uncertainty.png (PNG, matplotlib)

Every analysis runs jitted on padded test batches of the run's batch size, so
each compiles once.
"""
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from mtvae_jax import figures
from mtvae_jax import generate
from mtvae_jax import loop
from mtvae_jax import masks
from mtvae_jax import methods
from mtvae_jax import models
from mtvae_jax import train
from mtvae_jax import workdir as workdir_lib
from mtvae_jax.errors import UserError

FIGURES_DIR = 'figures'
NUM_FIGURE_IMAGES = 8
# Keys that fix the test split: a baseline must agree on them to be compared.
TEST_SPLIT_KEYS = ('seed', 'data.name', 'data.path', 'data.test_fraction')


def curve_counts(num_pixels):
  """0, then powers of two up to `num_pixels`, and `num_pixels` itself."""
  powers = [2 ** i for i in range(int(np.log2(num_pixels)) + 1)] if num_pixels else []
  return sorted({0, *powers, num_pixels})


def conditioned_error(state, images, weights, key, num_pixels, sampling, *, config):
  """{'recon_cond_loss': weighted sum of the conditioned decoder's MSE over the batch}.

  `num_pixels` pixels of each image are observed, drawn by masks.SAMPLINGS[sampling].
  Both are traced: the masks of every sampling type are drawn and one is picked,
  so a single program serves the whole curve.
  """
  mask_key, z_key = jax.random.split(key)
  sampler = functools.partial(masks.mask_fn(config.mask, count='fixed'), num_pixels=num_pixels)
  mask = jnp.stack([masks.batch_masks(mask_key, images, functools.partial(sampler, sampling=name))
                    for name in masks.SAMPLINGS])[sampling]
  m = masks.conditioning(images, mask)
  terms, _ = train.loss_terms(state, state.params, images, {'recon_cond': m}, z_key, train=False)
  return {'recon_cond_loss': jnp.sum(terms['recon_cond'] * weights)}


def sparse_curve(run):
  """{'num_pixels': [...], 'errors': {sampling: [test MSE, ...]}} of a multi or single run."""
  height, width, _ = run.splits.test.shape[1:]
  counts = curve_counts(height * width)
  error_fn = jax.jit(functools.partial(conditioned_error, config=run.config))

  def error(sampling, num_pixels):
    args = jnp.int32(num_pixels), jnp.int32(masks.SAMPLINGS.index(sampling))
    return loop.evaluate(lambda *batch: error_fn(*batch, *args), run.state, run.splits.test,
                         run.config.train.batch_size, run.eval_key)['recon_cond_loss']

  errors = {sampling: [error(sampling, n) for n in counts] for sampling in masks.SAMPLINGS}
  return {'num_pixels': counts, 'errors': errors}


def completion_moments(run, draw, num_samples, state, images, key):
  """Each image's evaluation mask (B, H, W, 1), and mean and std (B, H, W, C) of its completions.

  `num_samples` latents per image come from the prior (`draw`, from
  generate.latent_sampler) and go through the conditioned decoder of `state`.
  """
  run = run._replace(state=state)  # the parameters as arguments, not constants, under jit
  mask_key, sample_key = jax.random.split(key)
  mask = methods.eval_conds(run.config, images, mask_key)['recon_cond'][..., :1]
  keys = jax.random.split(sample_key, len(images))
  completions = jax.vmap(
      lambda k, x, mk: generate.complete(run, draw, k, x, mk, num_samples))(keys, images, mask)
  return mask, jnp.mean(completions, axis=1), jnp.std(completions, axis=1)


def calibration_sums(moments_fn, state, images, weights, key):
  """Sums over the hidden pixels of the batch (rows weighted by `weights` (B,)) for `calibration`."""
  mask, mean, std = moments_fn(state, images, key)
  hidden = jnp.broadcast_to((1.0 - mask) * weights[:, None, None, None], images.shape)
  error = jnp.abs(mean - images)
  values = {'pixels': 1.0, 'squared_error': error ** 2, 'abs_error': error, 'std': std,
            'std2': std ** 2, 'std_abs_error': std * error,
            'inside': (error <= 2.0 * std).astype(jnp.float32)}
  return {name: jnp.sum(value * hidden) for name, value in values.items()}


def calibration(sums):
  """uncertainty.json's statistics from calibration_sums (all sums on one common scale)."""
  mean = {name: value / sums['pixels'] for name, value in sums.items()}
  covariance = mean['std_abs_error'] - mean['std'] * mean['abs_error']
  variances = ((mean['std2'] - mean['std'] ** 2)
               * (mean['squared_error'] - mean['abs_error'] ** 2))
  correlation = float(covariance / np.sqrt(variances)) if variances > 0 else 0.0
  return {'mean_squared_error': mean['squared_error'], 'mean_abs_error': mean['abs_error'],
          'mean_std': mean['std'], 'coverage_2std': mean['inside'],
          'std_error_correlation': correlation}


def uncertainty(run, draw, num_samples):
  """(uncertainty.json's dict, figure columns for the first test images)."""
  moments_fn = jax.jit(functools.partial(completion_moments, run, draw, num_samples))
  batch_size = run.config.train.batch_size
  sums = loop.evaluate(functools.partial(calibration_sums, moments_fn), run.state,
                       run.splits.test, batch_size, run.eval_key)
  result = dict(calibration(sums), num_samples=num_samples,
                num_pixels=run.config.mask.num_pixels, sampling=run.config.mask.sampling,
                num_images=len(run.splits.test))
  # The first test batch again (same key as in evaluate), for the figure.
  batch, _ = next(loop.padded_batches(run.splits.test, batch_size))
  moments = jax.device_get(moments_fn(run.state, batch, jax.random.fold_in(run.eval_key, 0)))
  count = min(NUM_FIGURE_IMAGES, len(run.splits.test))
  images, (mask, mean, std) = batch[:count], (a[:count] for a in moments)
  error = np.abs(mean - images)
  vmax = float(max(std.max(), error.max(), 1e-6))  # std and error share one colour scale
  columns = [figures.Column('original', images),
             figures.Column('observed', figures.observed(images, mask)),
             figures.Column('mean', mean),
             figures.Column('std', std, 'magma', vmax),
             figures.Column('|error|', error, 'magma', vmax)]
  return result, columns


def reconstruction_figure_columns(run):
  """original | mask | decoder 1 | decoder 2 of the first test images."""
  images = run.splits.test[:NUM_FIGURE_IMAGES]
  reconstruct = jax.jit(functools.partial(
      figures.reconstruct, conds_fn=functools.partial(methods.eval_conds, run.config)))
  conds, outputs = jax.device_get(reconstruct(run.state, images, run.eval_key))
  return figures.reconstruction_columns(images, conds, outputs)


def sampling_type_columns(run):
  """Figure 3.6: rows exact, uniform, gaussian; columns original | mask | observed pixels."""
  image = run.splits.test[0]
  sampler = masks.mask_fn(run.config.mask, count='fixed')
  keys = jax.random.split(run.eval_key, len(masks.SAMPLINGS))
  draw = jax.jit(lambda keys: jnp.stack([sampler(key, image.shape[:2], sampling=sampling)
                                         for key, sampling in zip(keys, masks.SAMPLINGS)]))
  mask = np.asarray(draw(keys))
  images = np.broadcast_to(image, (len(masks.SAMPLINGS), *image.shape))
  return [figures.Column('original', images), figures.Column('mask', mask),
          figures.Column('observed', figures.observed(images, mask))]


def check_baseline(config, baseline_config, baseline):
  """Refuses a baseline of another model family or another test split."""
  keys = ('model', *TEST_SPLIT_KEYS)
  differ = workdir_lib.differences(config, baseline_config, keys)
  if differ:
    raise UserError(f"--baseline='{baseline}' differs from the run at {', '.join(differ)}: use a "
                    f'run of the same model on the same test split ({", ".join(keys)})')


def load_baseline(baseline):
  """(config, metrics) of the finished run in directory `baseline`, as dicts."""
  baseline = pathlib.Path(baseline)
  if not (baseline / workdir_lib.METRICS).is_file():
    raise UserError(f"--baseline='{baseline}' holds no finished run (no metrics.json): "
                    'train it first')
  return (workdir_lib.read_json(baseline / workdir_lib.CONFIG),
          workdir_lib.read_json(baseline / workdir_lib.METRICS))


def evaluate_run(workdir, baseline=None, num_samples=32):
  """Writes curve.json, uncertainty.json and figures/ into `workdir`; returns what it measured.

  baseline: another finished run of the same model and test split, usually
  method none, drawn beside this run in losses.png and curve.png.
  """
  if num_samples < 2:
    raise UserError(f'--num_samples={num_samples} is not allowed: use an integer >= 2')
  workdir = pathlib.Path(workdir)
  config = workdir_lib.load_config(workdir)
  histories = {f'{config.method} (this run)': workdir_lib.read_history(workdir)}
  baseline_metrics = None
  if baseline is not None:  # checked before the run is loaded, which takes a while
    baseline_config, baseline_metrics = load_baseline(baseline)
    check_baseline(config, baseline_config, baseline)
    histories[f'{baseline_config["method"]} (baseline)'] = workdir_lib.read_history(baseline)
  run = train.load_run(workdir)
  metrics = workdir_lib.read_json(workdir / workdir_lib.METRICS)
  out = workdir / FIGURES_DIR
  out.mkdir(exist_ok=True)

  results = {}
  figures.save_image_grid(out / 'reconstructions.png', reconstruction_figure_columns(run))
  figures.save_loss_curves(out / 'losses.png', histories, models.REGULARIZER[config.model])
  figures.save_image_grid(out / 'sampling_types.png', sampling_type_columns(run),
                          row_titles=masks.SAMPLINGS)
  if not methods.of(config).conditioned:
    print('curve and uncertainty skipped: they need a conditioned decoder (method multi or single)')
    return results

  curve = dict(sparse_curve(run), unconditioned=metrics['recon_loss'],
               baseline=baseline_metrics and baseline_metrics['recon_loss'])
  workdir_lib.write_json(workdir / 'curve.json', curve)
  figures.save_sparse_curve(out / 'curve.png', curve)
  results['curve'] = curve

  try:
    draw = generate.latent_sampler(run, workdir)
  except UserError as e:  # a VQ run without its prior
    print(f'uncertainty skipped: {e}')
    return results
  results['uncertainty'], columns = uncertainty(run, draw, num_samples)
  workdir_lib.write_json(workdir / 'uncertainty.json', results['uncertainty'])
  figures.save_image_grid(out / 'uncertainty.png', columns)
  return results
