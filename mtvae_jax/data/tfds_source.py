"""Data sets of tensorflow-datasets, read as ArrayRecord through tfds' data sources (no TensorFlow).

A `TfdsSet` reads, in this order: data.path (a local folder, read by the
set's `local` loader); its `system_path` when that folder exists; the copy
prepared in the TFDS data dir (data.tfds_data_dir, or tfds' default); or,
when the download hosts answer, tfds downloads and prepares it there first.
"""
import functools
import os
from typing import Callable, NamedTuple
import urllib.parse

import ml_collections
from PIL import Image

from mtvae_jax.data import cache
from mtvae_jax.data import images
from mtvae_jax.data import pipeline
from mtvae_jax.data import splits
from mtvae_jax.errors import UserError

PROBE_TIMEOUT_S = 5.0


class TfdsSet(NamedTuple):
  """One tfds data set: loader(data_config, seed) -> Splits of pipeline.Sources."""
  tfds_name: str
  image_shape: tuple  # (H, W, C) after preprocessing
  train: str  # the tfds split(s) that give training and validation images
  test: str
  local: Callable  # loader(data_config, seed) of a local folder in data.path
  local_folder: str  # what that folder holds, for messages
  crop: int = 0  # centre crop side before resizing to image_shape; 0: images as stored
  system_path: str = ''  # a copy a system package installs, read when present

  def __call__(self, data_config, seed):
    folder = data_config.path or (self.system_path if os.path.isdir(self.system_path) else '')
    if folder:
      if not os.path.isdir(folder):
        raise UserError(f"data.path='{folder}' is not a folder: data.name={data_config.name} reads "
                        f'{self.local_folder} from it')
      local_config = ml_collections.ConfigDict(data_config.to_dict())
      local_config.path = folder
      return self.local(local_config, seed)
    train, test = (pipeline.Source(records, functools.partial(decode, crop=self.crop,
                                                              size=self.image_shape[0]),
                                   self.image_shape, identity(records, self.crop))
                   for records in open_splits(self, data_config.tfds_data_dir))
    return splits.split(train, test, data_config, seed)


def identity(records, crop):
  """What a tfds data source's images are: builder name and version, data dir, split, crop."""
  info = records.dataset_info
  return cache.digest('tfds', info.full_name, str(info.data_dir), str(records.split), crop)


def decode(record, crop, size):
  """A tfds example -> uint8 (H, W, C): its image, centre-cropped and resized when crop > 0."""
  image = record['image']
  if not crop:
    return image
  pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
  return images.to_array(images.crop_and_resize(pil, crop, size), image.shape[-1])


def reachable(urls):
  """Whether every host of `urls` answers an HTTP request within PROBE_TIMEOUT_S (proxies honoured)."""
  import requests  # pylint: disable=import-outside-toplevel  # only when a set is downloaded
  hosts = {urllib.parse.urlsplit(url)._replace(path='/', query='', fragment='').geturl()
           for url in urls}
  try:
    for host in sorted(hosts):
      requests.head(host, timeout=PROBE_TIMEOUT_S, allow_redirects=False)
  except requests.RequestException:
    return False
  return True


def open_splits(dataset, data_dir):
  """tfds data sources of dataset.train and dataset.test, downloading the set if needed."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel  # slow to import
  builder = tfds.builder(dataset.tfds_name, data_dir=data_dir or None, file_format='array_record')
  where = data_dir or tfds.core.constants.DATA_DIR
  if not (builder.data_path.exists() and builder.is_prepared()):  # the first test keeps tfds quiet
    if not reachable(builder.url_infos or {}):
      raise UserError(
          f'data set {dataset.tfds_name} is not in the TFDS data dir {where} and cannot be '
          'downloaded (no network): put a prepared ArrayRecord copy there or point '
          f'data.tfds_data_dir at one, or set data.path to a local folder of '
          f'{dataset.local_folder}')
    try:
      builder.download_and_prepare()
    except (ImportError, OSError) as e:  # no TensorFlow for tfds' image encoding; network or disk
      message = str(e).strip().splitlines()[-1]
      raise UserError(f'downloading and preparing {dataset.tfds_name} into {where} failed: '
                      f'{message}') from None
  try:
    return [builder.as_data_source(split=split) for split in (dataset.train, dataset.test)]
  except NotImplementedError:
    raise UserError(
        f'the copy of {dataset.tfds_name} in {where} is not in ArrayRecord format: prepare it '
        'with file_format=array_record in another data.tfds_data_dir, or set data.path to a '
        f'local folder of {dataset.local_folder}') from None
