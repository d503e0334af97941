"""scikit-learn's bundled handwritten digits: 1,797 images of 8x8, no download."""
import numpy as np

from mtvae_jax.data import splits


def load(data_config, seed):
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  images = load_digits().images.astype(np.float32) / 16.0
  return splits.split(images[..., None], None, data_config, seed)
