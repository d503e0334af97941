"""Data set registry: config.data.name -> a loader of NHWC splits in [0, 1].

A loader takes the `data` config section and a seed and returns `Splits`
of float32 arrays or of `pipeline.Source`s (decoded on demand); `load` decodes
each Source once into a uint8 cache file (`cache`), then reads the splits
into memory but for a large training split, which then streams from the
cache (`pipeline.to_device` puts that cache on the device when it fits).
Adding a data set is one entry in DATASETS.
"""
import functools

from mtvae_jax.data import cache
from mtvae_jax.data import digits
from mtvae_jax.data import idx
from mtvae_jax.data import images
from mtvae_jax.data import pipeline
from mtvae_jax.data.splits import Splits
from mtvae_jax.data.tfds_source import TfdsSet

DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'
IDX_FOLDER = 'MNIST-format *images-idx3-ubyte[.gz] files'

DATASETS = {
    'digits': digits.load,
    'idx': idx.load,
    'images': images.load,
    'mnist': TfdsSet('mnist', (28, 28, 1), 'train', 'test', idx.load, IDX_FOLDER),
    'fashion_mnist': TfdsSet('fashion_mnist', (28, 28, 1), 'train', 'test', idx.load, IDX_FOLDER,
                             system_path=DEBIAN_FASHION_MNIST),
    'cifar10': TfdsSet('cifar10', (32, 32, 3), 'train', 'test',
                       functools.partial(images.load_folder, crop=0, size=0),
                       'PNG images (train/ and test/ subfolders for the official split)'),
    # Aligned faces: the usual centre crop of 148 x 148, then 64 x 64 (the thesis's size).
    'celeb_a': TfdsSet('celeb_a', (64, 64, 3), 'train+validation', 'test',
                       functools.partial(images.load_folder, crop=148, size=64),
                       "JPEG images such as CelebA's img_align_celeba", crop=148),
}


def load(data_config, seed):
  """Splits of the data set that data_config.name names, deterministic by seed."""
  # Sources decoded once into a cache file (unless data.cache_dir is 'none'), then read from it.
  train, validation, test = (
      cache.cached(split, data_config.name, data_config.cache_dir, data_config.num_workers)
      for split in DATASETS[data_config.name](data_config, seed))
  # Only a large training split streams; validation and test are a small share, in memory.
  read = functools.partial(pipeline.in_memory, num_workers=data_config.num_workers)
  return Splits(read(train, max_bytes=pipeline.IN_MEMORY_BYTES), read(validation), read(test))
