"""The model families as data, without their flax modules (models/ builds those).

What config validation, the loss balancing and the reports need to know of a
config.model, importable without flax:

  gaussian  Gaussian VAE: its regulariser is the KL term 'kl_loss'
  vq        VQ-VAE: its regulariser is the VQ objective 'vq_loss'
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Family:
  """title: its name in results tables; regularizer: its loss term beside the reconstruction
  terms, '<regularizer>_loss' in the metrics."""
  title: str
  regularizer: str


FAMILIES = {
    'gaussian': Family(title='Gaussian VAE', regularizer='kl'),
    'vq': Family(title='VQ-VAE', regularizer='vq'),
}
# How a conditioned decoder takes in m (config.conditioning; models/conditioning.py).
CONDITIONINGS = ('dense', 'spatial')


def regularizer_metric(model):
  """The metric of config.model's regulariser, e.g. 'kl_loss'."""
  return f'{FAMILIES[model].regularizer}_loss'
