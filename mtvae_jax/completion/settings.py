"""The completion's constants and the NamedTuples its modules share: the sampler's Settings, a
model Family, a loaded Completer.
"""
from typing import Any, Callable, NamedTuple

from mtvae_jax import train


METHODS = ('posterior', 'prior')
VALUE_RANGE = (0.0, 1.0)    # the data loaders' range, and the decoders' (a sigmoid)
CACHE_DIR = 'completion'
NOISE_IMAGES = 512           # validation images behind the noise scales
CALIBRATION_IMAGES = 32      # validation images behind each fraction's choices
CALIBRATION_SAMPLES = 32     # posterior draws per validation image behind the spread's choice
CALIBRATION_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5)   # observed fractions calibrated
SOURCES = ('decoder', 'neighbours', 'decoder_on_neighbours')   # what scores a proposal's fit
ESS_TARGETS = (8.0, 32.0, 128.0)  # candidate effective sample sizes of the weights
POOL_SIZE = 256              # PixelCNN prior samples of a VQ run, drawn once
SEARCH_VALUES = 2 ** 26      # at most this many pixel values of training images are searched
TARGET_ACCEPTANCE = 0.574    # MALA's optimal acceptance rate (Roberts and Rosenthal, 1998)
ADAPTATION_RATE = 2.0        # change of log step size per step, per unit of acceptance error
TEMPERATURE_RANGE = (-20.0, 20.0)   # log temperatures searched by `temper`
TEMPERATURE_STEPS = 48       # bisection steps of `temper`
RIDGES = (1e-3, 1e-2, 1e-1)   # candidate ridge penalties of regression_adjustment
ADJUSTMENT_STEPS = 64        # conjugate-gradient steps of regression_adjustment
CANDIDATES = [list(SOURCES), list(ESS_TARGETS), list(RIDGES)]   # noise.json's record of them
# Pixel values of one image's samples decoded at once: 2**20 took about 2.5 GB (8x8 digits).
MAX_SAMPLE_VALUES = 2 ** 20
MEMORY_SHARE = 4   # the samples of all images may take a quarter of the machine's memory


class Settings(NamedTuple):
  """Sampler sizes: the training images closest on the observed pixels, whose latents are the
  proposals (VQ: besides the PixelCNN pool); prior draws as proposals where neighbours is 0 (the
  model's own prior alone; a VQ run uses its pool); MCMC steps of the samples."""
  num_proposals: int = 256
  num_steps: int = 0
  neighbours: int = 256


class Family(NamedTuple):
  """What the samplers need of a model family; `data` holds its arrays (jit arguments).

  decode(variables, z (n, ...), m (n, H, W, 1 + C) or None) -> (n, H, W, C), None: g(z);
  prior(data, key, n) -> z (n, ...) from the model's prior;
  guided(variables, data, near (k, H, W, C)) -> proposals z (n, ...), log p(z) - log q(z) (n,)
    for their density q, `local`, what start and refine need of the prior given `near`, and
    `own` (n,), the row of `near` whose latent each proposal is (-1: none);
  start(local, key, z, own) -> z: the resampled proposals turned into draws of their
    neighbour's posterior (Gaussian: around its mean; VQ: its codes as they are);
  refine(data, local, key, z, log_likelihood, num_steps) -> z, MCMC moves targeting
    p(z) exp(log_likelihood(z)) (local None: the model's prior).
  """
  decode: Callable
  prior: Callable
  guided: Callable
  start: Callable
  refine: Callable
  data: Any


class Completer(NamedTuple):
  """A loaded run, ready to complete images: see `completer`."""
  run: train.Run
  family: Family
  noise: dict      # {'observed': s_obs, 'hidden': s_hid, 'weighting': [[source, ess, ridge]]
                   # per CALIBRATION_FRACTIONS entry, 'candidates': CANDIDATES, 'made_from':
                   # made_from's record}
  search: Any      # (N, H, W, C) training images searched for the nearest ones
  functions: dict  # completion_fn's jitted functions, by (method, num_samples, settings)
