"""Data set registry: config.data.name -> a loader of float32 NHWC splits in [0, 1].

A loader takes the `data` config section and returns `Splits`. Adding a data
set is one entry in DATASETS.
"""
from mtvae_jax.data import digits
from mtvae_jax.data import idx
from mtvae_jax.data.splits import Splits

DATASETS = {
    'digits': digits.load,
    'idx': idx.load,
}


def load(data_config, seed):
  """Splits of the data set that data_config.name names, deterministic by seed."""
  return DATASETS[data_config.name](data_config, seed)
