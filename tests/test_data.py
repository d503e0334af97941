"""Data sets: tfds sets (mocked, nothing downloads), image folders, the input pipeline."""
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from conftest import small_config
from mtvae_jax import config as config_lib
from mtvae_jax import data
from mtvae_jax import train
from mtvae_jax.data import images
from mtvae_jax.data import pipeline
from mtvae_jax.data import tfds_source
from mtvae_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
FASHION = pathlib.Path(data.DEBIAN_FASHION_MNIST)
# Requests through a proxy that refuses connections fail at once: "no network", whatever the machine.
OFFLINE = {'HTTPS_PROXY': 'http://127.0.0.1:9', 'HTTP_PROXY': 'http://127.0.0.1:9', 'NO_PROXY': ''}


def data_config(name, **overrides):
  config = small_config('gaussian', 'none').data
  config.name = name
  config.num_workers = 0
  config.update(overrides)
  return config


def write_images(folder, count, size=(24, 20), mode='RGB', seed=0):
  """`count` random PNG images of `size` (width, height) in `folder`."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  channels = images.CHANNELS[mode]
  for i in range(count):
    pixels = rng.integers(0, 256, (size[1], size[0], channels), np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(folder / f'{i:03d}.png')
  return folder


@pytest.mark.parametrize('name', ['mnist', 'fashion_mnist', 'cifar10', 'celeb_a'])
def test_every_tfds_set_loads_through_its_data_source(name, monkeypatch):
  dataset = data.DATASETS[name]
  monkeypatch.setitem(data.DATASETS, name, dataset._replace(system_path=''))
  monkeypatch.setattr(tfds_source, 'reachable', lambda urls: True)  # mock_data fakes the download
  with tfds.testing.mock_data(num_examples=20):
    splits = data.load(data_config(name), seed=0)
  assert [len(s) for s in splits] == [18, 2, 20]
  for split in splits:
    assert split.shape[1:] == dataset.image_shape and split.dtype == np.float32
    assert 0.0 <= split.min() and split.max() <= 1.0 and split.std() > 0.01


def test_a_set_without_a_copy_and_network_names_both_ways_to_provide_it(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_source, 'reachable', lambda urls: False)
  with pytest.raises(UserError) as error:
    data.load(data_config('mnist', tfds_data_dir=str(tmp_path)), seed=0)
  message = str(error.value)
  assert '\n' not in message
  for part in ('mnist', str(tmp_path), 'data.tfds_data_dir', 'data.path', 'idx3-ubyte'):
    assert part in message


def test_download_hosts_that_do_not_answer_count_as_offline(monkeypatch):
  for key, value in OFFLINE.items():
    monkeypatch.setenv(key, value)
  urls = tfds.builder('mnist').url_infos
  assert urls and not tfds_source.reachable(urls)


def test_mnist_offline_exits_with_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.main', '--config=configs/gauss_multi.py:mnist',
       f'--config.data.tfds_data_dir={tmp_path}', f'--workdir={tmp_path / "run"}'],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=str(ROOT), **OFFLINE))
  assert result.returncode == 2
  assert result.stderr.strip().count('\n') == 0, result.stderr
  assert 'data set mnist is not in the TFDS data dir' in result.stderr
  assert 'data.tfds_data_dir' in result.stderr and 'data.path' in result.stderr


@pytest.mark.skipif(not FASHION.is_dir(), reason='Debian package dataset-fashion-mnist not installed')
def test_fashion_mnist_reads_the_system_copy_without_network(monkeypatch):
  monkeypatch.setattr(tfds_source, 'open_splits', None)  # any tfds access would fail
  splits = data.load(data_config('fashion_mnist'), seed=0)
  assert [s.shape for s in splits] == [(54000, 28, 28, 1), (6000, 28, 28, 1), (10000, 28, 28, 1)]
  assert isinstance(splits.train, np.ndarray)


def test_data_path_replaces_the_tfds_copy(tmp_path):
  write_images(tmp_path / 'train', 12, size=(32, 32))
  write_images(tmp_path / 'test', 5, size=(32, 32), seed=1)
  splits = data.load(data_config('cifar10', path=str(tmp_path)), seed=0)
  assert [s.shape for s in splits] == [(11, 32, 32, 3), (1, 32, 32, 3), (5, 32, 32, 3)]


def test_image_folder_is_cropped_resized_and_split(tmp_path):
  folder = write_images(tmp_path / 'faces', 30, size=(20, 24))
  splits = data.load(data_config('images', path=str(folder), crop_size=16, image_size=8), seed=0)
  assert [s.shape for s in splits] == [(24, 8, 8, 3), (3, 8, 8, 3), (3, 8, 8, 3)]
  whole = np.concatenate(splits).reshape(30, -1)
  assert len(np.unique(whole, axis=0)) == 30  # disjoint splits that cover the folder


def test_crop_takes_the_centre():
  pixels = np.zeros((10, 8), np.uint8)
  pixels[3:7, 2:6] = 255  # a 4x4 white centre
  cropped = images.crop_and_resize(Image.fromarray(pixels), crop=4, size=0)
  np.testing.assert_array_equal(images.to_array(cropped, 1), np.full((4, 4, 1), 255, np.uint8))
  assert images.crop_and_resize(Image.fromarray(pixels), crop=4, size=2).size == (2, 2)


@pytest.mark.parametrize('bad,message', [
    ('text', 'bad.png is not a PNG or JPEG image'),
    ('rgba', 'bad.png has pixel type RGBA'),
    ('size', 'bad.png gives a (30, 40, 3) image'),
    ('small', 'bad.png is 10x10, smaller than data.crop_size=16'),
])
def test_bad_image_files_are_named(tmp_path, bad, message):
  folder = write_images(tmp_path, 3)
  if bad == 'text':
    (folder / 'bad.png').write_text('not an image')
  else:
    size, mode = {'rgba': ((24, 20), 'RGBA'), 'size': ((40, 30), 'RGB'),
                  'small': ((10, 10), 'RGB')}[bad]
    Image.new(mode, size).save(folder / 'bad.png')
  crop = 16 if bad == 'small' else 0
  with pytest.raises(UserError, match=re.escape(message)):
    data.load(data_config('images', path=str(folder), crop_size=crop), seed=0)


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
  order = pipeline.epoch_order(0, 3, 100, 16)
  assert order.shape == (6, 16) and len(np.unique(order)) == 96
  np.testing.assert_array_equal(order, pipeline.epoch_order(0, 3, 100, 16))
  assert not np.array_equal(order, pipeline.epoch_order(0, 4, 100, 16))
  assert not np.array_equal(order, pipeline.epoch_order(1, 3, 100, 16))


@pytest.mark.parametrize('num_workers', [0, 1])
def test_streamed_batches_equal_in_memory_batches(tmp_path, num_workers):
  source = images.source(sorted(write_images(tmp_path, 20).iterdir()), crop=0, size=0)
  array = pipeline.in_memory(source)
  order = pipeline.epoch_order(0, 1, len(source), 8)
  streamed = list(pipeline.batches(source, order, num_workers))
  resident = list(pipeline.batches(pipeline.to_device(array), order))
  assert len(streamed) == len(resident) == 2
  for a, b in zip(streamed, resident):
    np.testing.assert_allclose(a, b, atol=1e-7)


def test_training_streams_a_large_training_split(tmp_path, monkeypatch):
  monkeypatch.setattr(pipeline, 'IN_MEMORY_BYTES', 0)  # every training split counts as large
  config = small_config('gaussian', 'none', num_epochs=1)
  config.data = data_config('images', path=str(write_images(tmp_path / 'x', 150, size=(8, 8))))
  config.train.batch_size = 32
  splits = data.load(config.data, config.seed)
  assert isinstance(splits.train, pipeline.Source) and isinstance(splits.test, np.ndarray)
  metrics = train.train_and_evaluate(config, tmp_path / 'run')
  assert np.isfinite(metrics['loss']) and metrics['best_epoch'] == 1


@pytest.mark.parametrize('key', ['crop_size', 'image_size', 'num_workers'])
def test_negative_data_sizes_are_refused(key):
  config = small_config('gaussian', 'none')
  config.data[key] = -1
  with pytest.raises(UserError, match=f'config.data.{key}=-1 is not allowed'):
    config_lib.validate(config)
