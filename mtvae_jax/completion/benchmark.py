"""How well a run completes images from a few observed pixels, against simple baselines.

On the first test images, for each observed fraction f and mask sampling
(uniform: round(f H W) pixels at random per image; exact: the evenly spread
grid of that many pixels), every method predicts the hidden pixels:

  posterior           completion.py's posterior completion
  prior               completion.py's prior completion
  mean_image          the training-set mean; its samples are random training images
  interpolation       linear interpolation of the observed pixels (scipy's griddata),
                      nearest observed pixel outside their convex hull; no spread
  nearest_neighbours  the k training images closest on the observed pixels: their
                      mean, and the images themselves as samples

Scores, over the hidden pixels only:
  mse         mean squared error of the mean, over all hidden pixel values
  psnr        per image -10 log10(its hidden-pixel MSE) (values in [0, 1]), averaged
  ssim        dm-pix's SSIM map (11 x 11 Gaussian window, sigma 1.5) of the mean with
              its observed pixels set to the truth, against the truth, both
              reflection-padded so the map covers every pixel; averaged over the
              hidden pixels of each image, then over images
  crps        continuous ranked probability score of the samples, averaged over
              all hidden pixel values (lower is better)
  coverage90  share of hidden pixel values inside the samples' 5 % - 95 % quantiles
A method without samples has null crps and coverage90.

The posterior's hidden-pixel MSE and CRPS are also compared image by image with
each other method's: the mean of the per-image differences (posterior minus
method) and its 95 % confidence interval (paired t-test, scipy), which says
whether a gap is larger than the spread between images. Each method's speed
is its images per second over the whole call (the first call of a method
includes its compilation, and the posterior's first its calibration where
that is not cached yet).

`benchmark` returns {"fractions": [...], "results": {method: {sampling: {score: [one
value per fraction]}}}, "images_per_second": {method: {sampling: [...]}},
"posterior_vs": {method: {sampling: {"mse_difference": [...], "ci95": [[low, high],
...], "crps_difference": [...], "crps_ci95": [...]}}}} (null CRPS entries for a
method without samples), which `write` saves as sparse_benchmark.json with a figure.
"""
import functools
import json
import math
import pathlib
import time

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
from scipy import interpolate
from scipy import stats

from mtvae_jax import completion
from mtvae_jax import masks
from mtvae_jax.completion import predictive
from mtvae_jax.errors import UserError

FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5)
SAMPLINGS = ('uniform', 'exact')
METHODS = ('posterior', 'prior', 'mean_image', 'interpolation', 'nearest_neighbours')
SCORES = ('mse', 'psnr', 'ssim', 'crps', 'coverage90')
SSIM_WINDOW = 11
# posterior_vs's lists, by score: the per-image differences and their intervals.
VERSUS = {'mse': ('mse_difference', 'ci95'), 'crps': ('crps_difference', 'crps_ci95')}
RESULT_FILE = 'sparse_benchmark.json'
FIGURE_FILE = 'figures/sparse_benchmark.png'


# Scores.

def crps(samples, truth):
  """Per value CRPS (N, ...) of the samples (N, S, ...) at truth (N, ...): predictive.crps."""
  return np.asarray(predictive.crps(jnp.asarray(samples), jnp.asarray(truth)))


def inside_interval(samples, truth):
  """Per value 1.0 where truth (N, ...) lies within the central 90 % interval of the samples
  (N, S, ...), else 0.0: predictive.inside_interval."""
  return np.asarray(predictive.inside_interval(jnp.asarray(samples), jnp.asarray(truth)))


@jax.jit
def ssim_maps(truth, image):
  """(N, H, W, C) pairs -> (N, H, W) SSIM maps, the images reflection-padded to keep their size."""
  half = SSIM_WINDOW // 2
  pad = lambda a: jnp.pad(a, ((0, 0), (half, half), (half, half), (0, 0)), mode='reflect')
  maps = dm_pix.ssim(pad(truth), pad(image), filter_size=SSIM_WINDOW, return_map=True)
  return jnp.mean(maps, axis=-1)


def hidden_mse(truth, mask, mean):
  """Per image MSE (N,) over the hidden pixels of truth (N, H, W, C), mask (N, H, W, 1) and a
  method's mean (N, H, W, C)."""
  hidden = np.broadcast_to(mask == 0, truth.shape)
  return np.sum(np.square(mean - truth) * hidden, axis=(1, 2, 3)) / np.sum(hidden, axis=(1, 2, 3))


def hidden_crps(truth, mask, samples):
  """Per image mean CRPS (N,) over the hidden pixels of a method's samples (N, S, H, W, C)."""
  hidden = np.broadcast_to(mask == 0, truth.shape)
  return np.sum(crps(samples, truth) * hidden, axis=(1, 2, 3)) / np.sum(hidden, axis=(1, 2, 3))


def paired_difference(errors, reference):
  """Mean of errors - reference (N,) each, and its 95 % confidence interval [low, high] from a
  paired t-test; None where N < 2 or the differences do not vary."""
  difference = float(np.mean(errors - reference))
  if len(errors) < 2 or np.all(errors - reference == difference):
    return difference, None
  interval = stats.ttest_rel(errors, reference).confidence_interval(0.95)
  return difference, [float(interval.low), float(interval.high)]


def scores(truth, mask, mean, samples=None):
  """SCORES over the hidden pixels of truth (N, H, W, C), mask (N, H, W, 1) and a method's mean
  (N, H, W, C) and samples (N, S, H, W, C) or None."""
  hidden = np.broadcast_to(mask == 0, truth.shape)
  squared = np.square(mean - truth)
  per_image = hidden_mse(truth, mask, mean)
  composite = np.where(mask > 0, truth, mean).astype(np.float32)
  ssim = np.asarray(ssim_maps(truth.astype(np.float32), composite))
  pixels = hidden[..., 0]
  out = {'mse': float(np.mean(squared[hidden])),
         'psnr': float(np.mean(-10.0 * np.log10(np.maximum(per_image, 1e-10)))),
         'ssim': float(np.mean(np.sum(ssim * pixels, axis=(1, 2)) / np.sum(pixels, axis=(1, 2)))),
         'crps': None, 'coverage90': None}
  if samples is not None:
    out['crps'] = float(np.mean(crps(samples, truth)[hidden]))
    out['coverage90'] = float(np.mean(inside_interval(samples, truth)[hidden]))
  return out


# Baselines: each maps x (N, H, W, C, 0 where hidden) and mask (N, H, W, 1) to (mean, samples).

def mean_image(train_images, x, mask, num_samples, key):
  """The training mean for every image; samples: random training images (the marginal)."""
  del mask
  rows = jax.random.choice(key, len(train_images), (len(x), num_samples))
  return np.broadcast_to(np.mean(train_images, axis=0), x.shape), train_images[np.asarray(rows)]


def interpolation(x, mask):
  """Linear interpolation of each image's observed pixels, nearest outside their convex hull."""
  height, width = x.shape[1:3]
  grid = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing='ij'), -1)
  grid = grid.reshape(-1, 2)
  out = np.empty_like(x)
  for index, (image, observed) in enumerate(zip(x, mask[..., 0] > 0)):
    points, values = np.argwhere(observed), image[observed]
    nearest = interpolate.griddata(points, values, grid, method='nearest')
    try:
      linear = interpolate.griddata(points, values, grid, method='linear')
    except (ValueError, RuntimeError):  # too few points, or all on a line (qhull's error)
      linear = nearest
    out[index] = np.where(np.isnan(linear), nearest, linear).reshape(image.shape)
  return out, None


@functools.partial(jax.jit, static_argnames='k')
def _nearest_rows(train_images, x, mask, k):
  """Indices (N, k) of the training images closest to each of x (N, H, W, C) on its observed
  pixels, mask (N, H, W, 1): completion.nearest_rows per image."""
  return jax.vmap(lambda x, mask: completion.nearest_rows(x, mask, train_images, k))(x, mask)


def nearest_neighbours(train_images, x, mask, k):
  """The mean of the k training images closest on the observed pixels; samples: those images."""
  rows = np.asarray(_nearest_rows(train_images, x, mask, k))
  samples = train_images[rows]
  return samples.mean(axis=1), samples


# The benchmark.

def benchmark_masks(key, sampling, count, num_images, shape):
  """(num_images, H, W, 1) masks of `count` pixels: per image at random (uniform) or the grid."""
  sampler = functools.partial(masks.SAMPLERS[sampling], k=count, shape=shape)
  return np.asarray(jax.vmap(sampler)(jax.random.split(key, num_images)))


def check_fractions(fractions, num_pixels):
  """Sorted distinct observed fractions; each must leave 1 to num_pixels - 1 pixels observed."""
  bad = [f for f in fractions if not (math.isfinite(f) and 1 <= round(f * num_pixels) < num_pixels)]
  if bad or not fractions:
    raise UserError(f'observed fractions {bad or "(none)"} are not allowed: give fractions that '
                    f'observe from 1 to {num_pixels - 1} of the {num_pixels} pixels')
  return sorted(set(fractions))


def check_arguments(run, fractions, num_images, num_samples):
  """check_fractions's fractions for the test images of `run` (train.Run); UserError unless
  num_images of them fit, with num_samples samples each (completion.check_num_samples)."""
  test = run.splits.test
  fractions = check_fractions(list(fractions), math.prod(test.shape[1:3]))
  if not 1 <= num_images <= len(test):
    raise UserError(f'num_images={num_images} is not allowed: use 1 to {len(test)}, the test '
                    'images')
  completion.check_num_samples(num_samples, num_images, test.shape[1:])
  return fractions


def benchmark(helper, fractions=FRACTIONS, samplings=SAMPLINGS, num_images=100, num_samples=32,
              neighbours=16, seed=0, settings=completion.Settings(),
              log=functools.partial(print, flush=True)):
  """The sparse_benchmark.json dict for the run of `helper` (a completion.Completer)."""
  run = helper.run
  test, train_images = run.splits.test, np.asarray(run.splits.train)
  height, width, _ = test.shape[1:]
  fractions = check_arguments(run, fractions, num_images, num_samples)
  truth = np.asarray(test[:num_images])
  methods = {
      'posterior': lambda x, mask, key: _completion(helper, x, mask, num_samples, 'posterior',
                                                     seed, settings),
      'prior': lambda x, mask, key: _completion(helper, x, mask, num_samples, 'prior', seed,
                                                 settings),
      'mean_image': lambda x, mask, key: mean_image(train_images, x, mask, num_samples, key),
      'interpolation': lambda x, mask, key: interpolation(x, mask),
      'nearest_neighbours': lambda x, mask, key: nearest_neighbours(train_images, x, mask,
                                                                    neighbours),
  }
  results = {method: {sampling: {score: [] for score in SCORES} for sampling in samplings}
             for method in methods}
  speed = {method: {sampling: [] for sampling in samplings} for method in methods}
  versus = {method: {sampling: {name: [] for names in VERSUS.values() for name in names}
                     for sampling in samplings}
            for method in methods if method != 'posterior'}
  for s_index, sampling in enumerate(samplings):
    for f_index, fraction in enumerate(fractions):
      key = jax.random.fold_in(jax.random.key(seed), 100 * s_index + f_index)
      mask_key, method_key = jax.random.split(key)
      count = round(fraction * height * width)
      mask = benchmark_masks(mask_key, sampling, count, num_images, (height, width))
      x = np.where(mask > 0, truth, 0.0).astype(np.float32)
      per_image = {}
      for method, predict in methods.items():
        start = time.perf_counter()
        mean, samples = predict(x, mask, method_key)
        seconds = time.perf_counter() - start
        speed[method][sampling].append(num_images / seconds)
        measured = scores(truth, mask, np.asarray(mean), samples)
        for score, value in measured.items():
          results[method][sampling][score].append(value)
        per_image[method] = {'mse': hidden_mse(truth, mask, np.asarray(mean)),
                             'crps': None if samples is None else hidden_crps(truth, mask, samples)}
        for score, names in VERSUS.items() if method in versus else ():
          theirs = per_image[method][score]
          pair = (None, None) if theirs is None else paired_difference(
              per_image['posterior'][score], theirs)
          for name, value in zip(names, pair):
            versus[method][sampling][name].append(value)
        log(f'{sampling} {fraction:g} ({count} pixels) {method}: '
            + ' '.join(f'{k}={v:.4g}' for k, v in measured.items() if v is not None)
            + f' ({seconds:.1f} s, {num_images / seconds:.3g} images/s)')
  return {'fractions': fractions, 'results': results, 'images_per_second': speed,
          'posterior_vs': versus}


def _completion(helper, x, mask, num_samples, method, seed, settings):
  out = completion.complete_arrays(helper, x, mask, num_samples, method, seed, settings)
  return out['mean'], out['samples']


def save_figure(path, result):
  """One panel per score (rows) and sampling (columns): each method's score against the fraction."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  samplings = list(next(iter(result['results'].values())))
  figure = Figure(figsize=(4.5 * len(samplings), 2.8 * len(SCORES)), layout='constrained')
  axes = figure.subplots(len(SCORES), len(samplings), squeeze=False, sharex=True)
  for row, score in enumerate(SCORES):
    for col, sampling in enumerate(samplings):
      ax = axes[row, col]
      for method, by_sampling in result['results'].items():
        values = by_sampling[sampling][score]
        if values[0] is not None:
          ax.plot(result['fractions'], values, marker='o', label=method)
      if score == 'coverage90':
        ax.axhline(0.9, color='gray', linestyle=':')
      ax.set_xscale('log')
      ax.set_ylabel(score)
      ax.set_title(f'{sampling} masks')
      ax.set_xlabel('observed fraction of the pixels')
  axes[0, 0].legend(fontsize='small')
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=100)


def write(workdir, result):
  """<workdir>/sparse_benchmark.json and <workdir>/figures/sparse_benchmark.png."""
  workdir = pathlib.Path(workdir)
  (workdir / RESULT_FILE).write_text(json.dumps(result, indent=2) + '\n')
  save_figure(workdir / FIGURE_FILE, result)


def _rows(fractions, title, rows):
  """A markdown table of `title` columns masks | method, then one cell per fraction."""
  return ['', title, '', '| masks | method | ' + ' | '.join(f'{100 * f:.3g} %' for f in fractions)
          + ' |', '|---|---|' + '---:|' * len(fractions)] + [
              f'| {sampling} | {method} | ' + ' | '.join(cells) + ' |'
              for sampling, method, cells in rows]


def _difference(value, interval):
  if value is None:
    return '–'
  return f'{value:+.4f}' + ('' if interval is None else ' [{:+.4f}, {:+.4f}]'.format(*interval))


def table(result):
  """Markdown tables by fraction, per sampling and method: hidden-pixel MSE, CRPS and 90 %
  coverage; images per second; the posterior's paired differences from each method."""
  fractions, results = result['fractions'], result['results']
  samplings = list(next(iter(results.values())))
  number = lambda value, digits: '–' if value is None else f'{value:.{digits}f}'
  cells = lambda values: [f'{number(mse, 4)} / {number(crps_, 4)} / {number(cov, 2)}'
                          for mse, crps_, cov in zip(values['mse'], values['crps'],
                                                     values['coverage90'])]
  lines = _rows(fractions, 'hidden-pixel MSE / CRPS / coverage90', [
      (sampling, method, cells(by_sampling[sampling]))
      for sampling in samplings for method, by_sampling in results.items()])
  if 'images_per_second' in result:
    lines += _rows(fractions, 'images per second', [
        (sampling, method, [f'{v:.3g}' for v in by_sampling[sampling]])
        for sampling in samplings for method, by_sampling in result['images_per_second'].items()])
  for score, names in VERSUS.items():
    lines += _rows(fractions, f'posterior minus each method, per-image hidden-pixel '
                   f'{score.upper()}: mean [95 % interval]', [
                       (sampling, method, [_difference(*pair) for pair in zip(
                           *(by_sampling[sampling].get(name, ()) for name in names))])
                       for sampling in samplings
                       for method, by_sampling in result.get('posterior_vs', {}).items()])
  return '\n'.join(lines[1:])
