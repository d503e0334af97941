"""The training methods (thesis 3.2, 3.3) as data: one `Method` per config.method.

  none    decoder p(x|z) only: the plain VAE or VQ-VAE
  multi   p(x|z) and a conditioned decoder p(x|z, m), both decoding one shared z
  single  one conditioned decoder p(x|z, m), given m = 0 when nothing is observed

The models build the decoders a method names, training and evaluation feed
them the inputs it names, and its reconstruction terms (with the model's KL or
VQ term) are the loss terms.
"""
import dataclasses
from typing import Mapping

from mtvae_jax import masks

PLAIN = 'decoder'              # the submodule p(x|z)
CONDITIONED = 'cond_decoder'   # the submodule p(x|z, m)


@dataclasses.dataclass(frozen=True)
class Method:
  """What one method builds, trains and evaluates.

  title: its name in results tables. decoders: the model's decoder submodules
  (PLAIN, CONDITIONED). train, evaluate: {reconstruction term: whether its
  decoder is given m}: during training m is drawn with config.mask, during
  evaluation with the fixed count config.mask.num_pixels; a term without m
  goes to PLAIN, or to CONDITIONED with an empty mask where PLAIN is absent.
  sampling, count: the method's defaults of config.mask.sampling and .count.
  """
  title: str
  decoders: tuple[str, ...]
  train: Mapping[str, bool]
  evaluate: Mapping[str, bool]
  sampling: str
  count: str

  @property
  def conditioned(self):
    """Whether the model has p(x|z, m), so that it can complete given pixels."""
    return CONDITIONED in self.decoders


METHODS = {
    'none': Method(title='-', decoders=(PLAIN,), train={'recon': False},
                   evaluate={'recon': False}, sampling='uniform', count='fixed'),
    'multi': Method(title='Multi decoder', decoders=(PLAIN, CONDITIONED),
                    train={'recon': False, 'recon_cond': True},
                    evaluate={'recon': False, 'recon_cond': True}, sampling='exact',
                    count='fixed'),
    'single': Method(title='Single decoder', decoders=(CONDITIONED,), train={'recon': True},
                     evaluate={'recon': False, 'recon_cond': True}, sampling='uniform',
                     count='power_law'),
}


def of(config):
  """The Method of config.method."""
  return METHODS[config.method]


def decoder_inputs(terms, draw):
  """{term: m or None} for `terms` {term: given m}; m = draw(), called once and only if needed."""
  m = draw() if any(terms.values()) else None
  return {term: m if given else None for term, given in terms.items()}


def _draw(images, key, sampler):
  return lambda: masks.conditioning(images, masks.batch_masks(key, images, sampler))


def train_conds(config, images, key):
  """The decoders' inputs during training, {term: m (B, H, W, 1 + C) or None}; one mask per image
  drawn with config.mask."""
  return decoder_inputs(of(config).train, _draw(images, key, masks.mask_fn(config.mask)))


def eval_conds(config, images, key):
  """The decoders' inputs during evaluation: masks of the fixed count config.mask.num_pixels."""
  sampler = masks.mask_fn(config.mask, count='fixed')
  return decoder_inputs(of(config).evaluate, _draw(images, key, sampler))
