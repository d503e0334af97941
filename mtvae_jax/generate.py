"""Images from every trained model: from the prior alone, or completing a few given pixels.

Latent samples come from the model's prior: a Gaussian run draws
z ~ N(0, T^2 I); a VQ run draws codes from its PixelCNN prior (prior.py) with
logits divided by T, and looks up their z_q. T is the temperature.

  samples:      decoder 1 (methods none, multi), or the single decoder with an
                empty mask;
  completions:  (multi, single) the conditioned decoder given
                m = concat(mask, mask * x) of one test image x, once per latent
                sample, with the per-pixel mean and standard deviation.

`generate` writes <workdir>/samples/:
  samples.png       grid of the samples
  completions.png   grid of the completions
  given_pixels.png  the test image | its given pixels (the others blue) | mean | 2 * std
  (each grid drawn pixel for pixel under its title, figures.save_grid)
  samples.npz       every array above, float32
"""
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from mtvae_jax import figures
from mtvae_jax import masks
from mtvae_jax import methods
from mtvae_jax import prior
from mtvae_jax import train
from mtvae_jax.errors import UserError

SAMPLES_DIR = 'samples'
MIN_SIDE = 64       # images are enlarged (nearest neighbour) to at least this many pixels a side
UNOBSERVED = (0.15, 0.3, 0.9)   # RGB of the pixels not given, in given_pixels.png
GIVEN_PIXELS_TITLES = ('test image', 'given pixels', 'mean', '2 × std')


def gaussian_latents(run):
  """(key, num, temperature) -> z (num, latent_dim) ~ N(0, temperature^2 I)."""
  latent_dim = run.config.gaussian.latent_dim
  return lambda key, num, temperature: temperature * jax.random.normal(key, (num, latent_dim))


def code_latents(run, prior_model, prior_params):
  """(key, num, temperature) -> z_q (num, h, w, D) of codes drawn from the PixelCNN prior."""
  grid = prior.code_grid(run)
  sample = prior.sampler(prior_model)

  def draw(key, num, temperature):
    return prior.apply_model(run, 'lookup', sample(prior_params, key, (num, *grid), temperature))

  return draw


def _vq_latents(run, workdir):
  model, state = prior.load_prior(workdir, run)
  return code_latents(run, model, state.params)


LATENT_SAMPLERS = {'gaussian': lambda run, workdir: gaussian_latents(run), 'vq': _vq_latents}


def latent_sampler(run, workdir):
  """(key, num, temperature) -> `num` latents from the prior of the run in `workdir`."""
  return LATENT_SAMPLERS[run.config.model](run, workdir)


def sample_images(run, draw, key, num, temperature=1.0):
  """(num, H, W, C) images from prior samples, through decoder 1 or the empty mask."""
  return prior.apply_model(run, 'decode', draw(key, num, temperature), None)


def complete(run, draw, key, image, mask, num, temperature=1.0):
  """(num, H, W, C) completions of `image` (H, W, C) from its pixels where `mask` (H, W, 1) = 1."""
  m = masks.conditioning(image[None], mask[None])
  m = jnp.broadcast_to(m, (num, *m.shape[1:]))
  return prior.apply_model(run, 'decode', draw(key, num, temperature), m)


def image_grid(images, columns):
  """(N, h, w, C) in [0, 1] -> uint8 grid image, gray lines between cells, enlarged to MIN_SIDE."""
  num, height, width, channels = images.shape
  scale = -(-MIN_SIDE // max(height, width))
  rows = -(-num // columns)
  images = np.concatenate([images, np.full((rows * columns - num, height, width, channels), 0.5)])
  images = np.repeat(np.repeat(images, scale, axis=1), scale, axis=2)
  grid = figures.lay_out(images.reshape(rows, columns, *images.shape[1:]), fill=0.5)
  grid = np.pad(grid, ((1, 1), (1, 1), (0, 0)), constant_values=0.5)
  return np.round(255 * np.clip(grid, 0.0, 1.0)).astype(np.uint8)


def _rgb(images):
  return np.broadcast_to(images, (*images.shape[:-1], 3)) if images.shape[-1] == 1 else images


def given_pixels_panel(image, mask, mean, std):
  """The four (H, W, 3) panels of given_pixels.png, stacked: image, given pixels, mean, 2 * std."""
  observed = np.where(mask > 0, _rgb(image), np.asarray(UNOBSERVED))
  return np.stack([_rgb(image), observed, _rgb(mean), _rgb(np.clip(2 * std, 0.0, 1.0))])


def _check(ok, name, value, allowed):
  if not ok:
    raise UserError(f'{name}={value!r} is not allowed: {allowed}')


def generate_arrays(run, draw, num=16, *, pixels=None, sampling=None, temperature=1.0, image=0,
                    seed=0) -> dict:
  """Samples and (multi, single) completions of test image `image`, as float32 arrays.

  draw: the run's latent sampler (`latent_sampler`). pixels / sampling: the
  given pixels' count and mask sampler (exact, uniform, gaussian), default the
  run's mask.num_pixels and mask.sampling. Returns {'samples'} and, for multi
  and single runs, 'image', 'mask', 'completions', 'mean', 'std'. Raises
  UserError for bad arguments.
  """
  height, width, _ = run.splits.test.shape[1:]
  _check(num >= 1, 'num', num, 'use an integer >= 1')
  _check(0 < temperature < math.inf, 'temperature', temperature, 'use a finite number > 0')
  _check(0 <= seed < 2**32, 'seed', seed, 'use an integer from 0 to 2**32 - 1')
  _check(sampling in (None, *masks.SAMPLINGS), 'sampling', sampling,
         'use one of ' + ', '.join(masks.SAMPLINGS))
  _check(pixels is None or 0 <= pixels <= height * width, 'pixels', pixels,
         f'use a count from 0 to {height * width}, the pixels of a {height}x{width} image')
  _check(0 <= image < len(run.splits.test), 'image', image,
         f'use a test image index from 0 to {len(run.splits.test) - 1}')
  conditioned = methods.of(run.config).conditioned
  if not conditioned:
    for name, value in (('pixels', pixels), ('sampling', sampling)):
      _check(value is None, name, value, f"this run's method is {run.config.method}, without a "
             'conditioned decoder: give pixels to a multi or single run')

  sample_key, complete_key, mask_key = jax.random.split(jax.random.key(seed), 3)
  out = {'samples': sample_images(run, draw, sample_key, num, temperature)}
  if conditioned:
    mask_config = run.config.mask.copy_and_resolve_references()
    mask_config.sampling = sampling or mask_config.sampling
    mask_config.num_pixels = mask_config.num_pixels if pixels is None else pixels
    given = run.splits.test[image]
    mask = masks.mask_fn(mask_config, count='fixed')(mask_key, (height, width))
    completions = complete(run, draw, complete_key, given, mask, num, temperature)
    out.update(image=given, mask=mask, completions=completions,
               mean=jnp.mean(completions, axis=0), std=jnp.std(completions, axis=0))
  return {name: np.asarray(value, np.float32) for name, value in out.items()}


def generate(workdir, num=16, **kwargs) -> dict:
  """generate_arrays for the finished run in `workdir`, written to <workdir>/samples/.

  A VQ run needs its trained prior (experiments.prior).
  """
  run = train.load_run(workdir)
  out = generate_arrays(run, latent_sampler(run, workdir), num, **kwargs)
  write_samples(pathlib.Path(workdir) / SAMPLES_DIR, out)
  return out


def write_samples(folder, out):
  """PNG grids and samples.npz of generate's arrays into `folder`."""
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"samples folder '{folder}' cannot be created: {e.strerror}") from None
  columns = math.ceil(math.sqrt(len(out['samples'])))
  figures.save_grid(folder / 'samples.png', image_grid(out['samples'], columns),
                    'samples from the prior')
  if 'completions' in out:
    figures.save_grid(folder / 'completions.png', image_grid(out['completions'], columns),
                      'completions of the given pixels')
    figures.save_grid(folder / 'given_pixels.png', image_grid(
        given_pixels_panel(out['image'], out['mask'], out['mean'], out['std']), columns=4),
                      'a test image and its completions', GIVEN_PIXELS_TITLES)
  np.savez(folder / 'samples.npz', **out)
