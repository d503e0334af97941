"""Data sets: tfds sets (mocked, nothing downloads), image folders, the input pipeline."""
import gzip
import os
import pathlib
import re
import struct
import subprocess
import sys
import types
import zlib

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from conftest import run_main
from conftest import small_config
from mtvae_jax import config as config_lib
from mtvae_jax import data
from mtvae_jax import train
from mtvae_jax.data import cache
from mtvae_jax.data import images
from mtvae_jax.data import pipeline
from mtvae_jax.data import splits
from mtvae_jax.data import tfds_source
from mtvae_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
FASHION = pathlib.Path(data.DEBIAN_FASHION_MNIST)
# Requests through a proxy that refuses connections fail at once: "no network", whatever the machine.
OFFLINE = {'HTTPS_PROXY': 'http://127.0.0.1:9', 'HTTP_PROXY': 'http://127.0.0.1:9', 'NO_PROXY': ''}


@pytest.fixture(autouse=True)
def cache_folder(tmp_path_factory, monkeypatch):
  """The folder that decoded sets are cached in: the test's own, not ~/.cache."""
  folder = tmp_path_factory.mktemp('cache')
  monkeypatch.setattr(cache, 'DEFAULT_DIR', str(folder))
  return folder


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


def test_max_images_draws_one_subset_in_the_official_proportions_that_every_fold_splits():
  train_set, test_set = np.arange(6000), np.arange(6000, 7000)  # image i is the number i
  config = data_config('fashion_mnist', max_images=700, num_folds=3)
  folds = []
  for index in range(3):
    config.fold = index
    folds.append(splits.split(train_set, test_set, config, seed=0))
  assert [len(s) for s in folds[0]] == [400, 200, 100]
  pool = np.concatenate([f.validation for f in folds])
  assert len(set(pool)) == 600 and set(pool) == set(folds[0].train) | set(folds[0].validation)
  assert set(pool) < set(train_set) and set(folds[0].test) < set(test_set)
  assert all(np.array_equal(f.test, folds[0].test) for f in folds)
  assert np.array_equal(splits.split(train_set, test_set, config, seed=0).train, folds[2].train)
  assert not np.array_equal(splits.split(train_set, test_set, config, seed=1).test, folds[0].test)


def test_max_images_applies_before_the_test_fraction_of_a_set_without_a_test_split():
  splits = data.load(data_config('digits', max_images=300, test_fraction=0.2,
                                 validation_fraction=0.25), seed=0)
  assert [len(s) for s in splits] == [180, 60, 60]
  with pytest.raises(UserError, match='data.max_images=2'):
    data.load(data_config('digits', max_images=2), seed=0)


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


def test_training_streams_a_large_training_split_from_its_cache(tmp_path, monkeypatch):
  monkeypatch.setattr(pipeline, 'IN_MEMORY_BYTES', 0)  # every training split counts as large
  config = small_config('gaussian', 'none', num_epochs=1)
  config.data = data_config('images', path=str(write_images(tmp_path / 'x', 150, size=(8, 8))))
  config.train.batch_size = 32
  splits = data.load(config.data, config.seed)
  assert isinstance(splits.train, pipeline.Cached) and isinstance(splits.test, np.ndarray)
  assert isinstance(pipeline.to_device(splits.train).records, jax.Array)  # the cache fits
  metrics = train.train_and_evaluate(config, tmp_path / 'run')
  assert np.isfinite(metrics['loss']) and metrics['best_epoch'] == 1


@pytest.mark.parametrize('key', ['crop_size', 'image_size', 'num_workers'])
def test_negative_data_sizes_are_refused(key):
  config = small_config('gaussian', 'none')
  config.data[key] = -1
  with pytest.raises(UserError, match=f'config.data.{key}=-1 is not allowed'):
    config_lib.validate(config)


def counting_decodes(monkeypatch):
  """A list that gets the path of every image file decoded from now on."""
  decoded, decode = [], images.decode
  monkeypatch.setattr(images, 'decode', lambda path, **kw: decoded.append(path) or decode(path, **kw))
  return decoded


def test_a_streamed_set_is_decoded_once_into_its_cache(tmp_path, cache_folder, monkeypatch):
  config = data_config('images', path=str(write_images(tmp_path, 30, size=(20, 24))), crop_size=16,
                       image_size=8)
  decoded = counting_decodes(monkeypatch)
  first = data.load(config, seed=0)
  [file] = cache_folder.iterdir()
  assert len(decoded) == 30 and file.name.startswith('images-30x8x8x3-')
  written = file.stat().st_mtime_ns
  second = data.load(config, seed=0)
  assert len(decoded) == 30 and file.stat().st_mtime_ns == written
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)


def test_the_cache_name_changes_with_what_made_it(tmp_path):
  folder = write_images(tmp_path, 5)
  name = lambda crop=0, size=0, dataset='images': cache.path(
      images.source(sorted(folder.iterdir()), crop, size), dataset, '').name
  before = name()
  assert len({before, name(crop=16), name(size=8), name(dataset='cifar10')}) == 4
  os.utime(folder / '003.png', ns=(0, 0))  # the same bytes, another mtime: a changed file
  changed = name()
  Image.new('RGB', (24, 20)).save(folder / 'extra.png')  # another file
  assert len({before, changed, name()}) == 3 and name() == name()


def test_an_interrupted_or_damaged_cache_is_never_used(tmp_path, cache_folder, monkeypatch):
  config = data_config('images', path=str(write_images(tmp_path, 20)))
  decode = images.decode
  def fail_at_the_last_file(path, **kw):
    if path.endswith('019.png'):
      raise RuntimeError('interrupted')
    return decode(path, **kw)
  monkeypatch.setattr(images, 'decode', fail_at_the_last_file)
  with pytest.raises(RuntimeError, match='interrupted'):
    data.load(config, seed=0)
  assert not list(cache_folder.iterdir())
  monkeypatch.setattr(images, 'decode', decode)
  decoded = counting_decodes(monkeypatch)
  whole = data.load(config, seed=0)
  [file] = cache_folder.iterdir()
  with open(file, 'r+b') as f:  # damaged: cut short
    f.truncate(file.stat().st_size // 2)
  killed = cache.partial_path(file, 2**22 + 1)  # what a killed build left; no pid is that large
  running = cache.partial_path(file, os.getppid())  # another build, still running
  killed.touch()
  running.touch()
  again = data.load(config, seed=0)
  assert len(decoded) == 40 and sorted(cache_folder.iterdir()) == sorted([file, running])
  for a, b in zip(whole, again):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('problem', ['disk full', 'no folder'])
def test_a_cache_that_cannot_be_written_is_refused_in_one_line(tmp_path, monkeypatch, problem):
  config = data_config('images', path=str(write_images(tmp_path / 'x', 20)),
                       cache_dir=str(tmp_path / 'cache'))
  if problem == 'disk full':
    monkeypatch.setattr(cache.shutil, 'disk_usage', lambda path: types.SimpleNamespace(free=10**4))
    expected = (f'the decoded cache of images needs 0.00 GB in {tmp_path / "cache"}, which has '
                '0.00 GB free: free space there, set data.cache_dir to a folder with room, or to '
                'none to decode images every epoch')
  else:
    (tmp_path / 'cache').write_text('a file, not a folder')
    config.cache_dir = str(tmp_path / 'cache' / 'sub')
    expected = f"data.cache_dir='{config.cache_dir}': the cache folder"
  with pytest.raises(UserError, match=re.escape(expected)) as error:
    data.load(config, seed=0)
  assert '\n' not in str(error.value)
  config.cache_dir = 'none'  # no cache: decoded every time
  assert isinstance(data.load(config, seed=0).train, np.ndarray)


@pytest.mark.parametrize('name', ['images', 'celeb_a'])
def test_batches_from_the_cache_are_the_batches_decoded_from_the_source(tmp_path, monkeypatch, name):
  monkeypatch.setattr(pipeline, 'IN_MEMORY_BYTES', 0)  # the training split streams
  monkeypatch.setitem(data.DATASETS, 'celeb_a', data.DATASETS['celeb_a']._replace(system_path=''))
  monkeypatch.setattr(tfds_source, 'reachable', lambda urls: True)
  path = str(write_images(tmp_path, 40)) if name == 'images' else ''
  with tfds.testing.mock_data(num_examples=40):
    cached, decoded = (data.load(data_config(name, path=path, cache_dir=where), seed=0)
                       for where in ('', 'none'))
    assert isinstance(cached.train, pipeline.Cached) and not isinstance(decoded.train, pipeline.Cached)
    order = pipeline.epoch_order(0, 1, len(decoded.train), 8)
    expected = [np.asarray(batch) for batch in pipeline.batches(decoded.train, order)]
    for budget in (0, float('inf')):  # read on the host from the memory map; gathered on the device
      batches = pipeline.batches(pipeline.to_device(cached.train, budget), order)
      for got, want in zip(batches, expected, strict=True):
        assert got.dtype == np.float32 and np.array_equal(np.asarray(got), want)
  for got, want in zip(cached[1:], decoded[1:]):  # validation and test, in memory
    assert np.array_equal(got, want)


def png_bytes(width, height, rows):
  """An RGB PNG file of width x height whose pixel data (IDAT) is `rows` (zlib-compressed)."""
  def chunk(kind, body):
    return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
          + chunk(b'IDAT', rows) + chunk(b'IEND', b''))


def png_header_only(path, width, height):
  """A PNG file whose header says width x height RGB, with a few rows of pixel data."""
  path.write_bytes(png_bytes(width, height, zlib.compress(b'\0' * (1 + 3 * width) * 4)))


def test_a_png_cut_short_with_its_checksums_and_a_flipped_bit_is_refused_not_misread(tmp_path):
  folder = write_images(tmp_path, 3, size=(4, 4))
  pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
  rows = zlib.compress(b''.join(b'\0' + row.tobytes() for row in pixels), level=0)  # stored as is
  raw = bytearray(png_bytes(4, 4, rows))
  start = raw.index(b'IDAT') + 4
  raw[start + 2 + 5 + 1] ^= 1  # after the zlib and block headers and the row's filter: a pixel
  (folder / 'cut.png').write_bytes(raw[:start + len(rows) - 2])  # without the CRC and adler32
  with pytest.raises(UserError, match=re.escape(f'data file {folder / "cut.png"} cannot be read (')):
    data.load(data_config('images', path=str(folder)), seed=0)


def damage(path, how):
  """Damages image file `path` in a way that only decoding finds."""
  raw = bytearray(path.read_bytes())
  if how == 'truncated PNG':
    del raw[len(raw) // 2:]
  elif how == 'corrupt IDAT':
    start = raw.index(b'IDAT') + 4
    raw[start:start + 8] = b'\xff' * 8
  elif how == 'JPEG cut in its scan data':
    del raw[raw.index(b'\xff\xda') + 40:]
  path.write_bytes(bytes(raw))


@pytest.mark.parametrize('how,reason', [
    ('truncated PNG', 'Truncated File Read'),
    ('corrupt IDAT', "broken PNG file (bad header checksum in b'IDAT')"),
    ('JPEG cut in its scan data', 'image file is truncated'),
])
def test_an_image_that_fails_only_when_decoded_is_named_in_one_line(tmp_path, how, reason):
  folder = write_images(tmp_path, 5, size=(16, 16))
  if how.startswith('JPEG'):
    for path in sorted(folder.iterdir()):
      Image.open(path).save(path.with_suffix('.jpg'))
      path.unlink()
  bad = sorted(folder.iterdir())[2]
  damage(bad, how)
  assert images._output_shape(bad, 0, 0) == (16, 16, 3)  # the header is whole
  with pytest.raises(UserError, match=re.escape(f'data file {bad} cannot be read ({reason}')) as error:
    data.load(data_config('images', path=str(folder)), seed=0)
  assert '\n' not in str(error.value) and 'replace it with a whole PNG or JPEG image' in str(error.value)


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
  folder = write_images(tmp_path, 3)
  png_header_only(folder / 'bomb.png', 30000, 30000)
  with pytest.raises(UserError, match=re.escape(f'data file {folder / "bomb.png"} has more than '
                                                '178,956,970 pixels, too many to decode safely')):
    data.load(data_config('images', path=str(folder), image_size=8), seed=0)


def test_a_file_changed_after_its_check_is_refused_not_misread(tmp_path):
  folder = write_images(tmp_path, 3)
  source = images.source(sorted(folder.iterdir()), crop=0, size=0)
  Image.new('RGB', (20, 24)).save(folder / '001.png')  # another size since the check
  with pytest.raises(UserError, match=re.escape(
      f'data file {folder / "001.png"} changed while it was read: it now gives a (24, 20, 3) image, '
      'not (20, 24, 3)')):
    pipeline.in_memory(source)


@pytest.mark.parametrize('count,fractions', [(1, {}), (2, {}), (
    20, {'test_fraction': 0.99, 'validation_fraction': 0.99})])
def test_too_few_images_for_three_splits_are_refused(tmp_path, count, fractions):
  folder = write_images(tmp_path, count)
  with pytest.raises(UserError, match=re.escape(
      f"data set images in data.path='{folder}' gives no train image ({count} images in all, "
      'data.test_fraction=')) as error:
    data.load(data_config('images', path=str(folder), **fractions), seed=0)
  assert 'use at least 3 images, one per split, or smaller fractions' in str(error.value)


def test_a_subfolder_that_cannot_be_listed_is_refused_not_skipped(tmp_path, monkeypatch):
  folder = write_images(tmp_path / 'x', 4)
  write_images(folder / 'more', 4, seed=1)
  scandir = os.scandir
  def refuse_more(path='.'):
    if os.fspath(path).endswith('more'):
      raise PermissionError(13, 'Permission denied', os.fspath(path))
    return scandir(path)
  monkeypatch.setattr(os, 'scandir', refuse_more)  # what an unreadable folder gives, even for root
  with pytest.raises(UserError, match=re.escape(
      f'data folder {folder / "more"} cannot be listed (Permission denied)')):
    data.load(data_config('images', path=str(folder)), seed=0)


def test_a_link_to_a_missing_image_is_refused_not_skipped(tmp_path):
  folder = write_images(tmp_path / 'x', 4)
  (folder / 'gone.png').symlink_to(tmp_path / 'unmounted' / 'gone.png')
  with pytest.raises(UserError, match=re.escape(f'data file {folder / "gone.png"} is a link to ')):
    data.load(data_config('images', path=str(folder)), seed=0)


def test_linked_subfolders_are_read_once_each(tmp_path):
  folder = write_images(tmp_path / 'x', 4)
  elsewhere = write_images(tmp_path / 'elsewhere', 4, seed=1)
  (folder / 'linked').symlink_to(elsewhere)
  (folder / 'again').symlink_to(elsewhere)  # one folder twice
  (elsewhere / 'up').symlink_to(tmp_path / 'x')  # a cycle
  splits = data.load(data_config('images', path=str(folder)), seed=0)
  assert sum(len(split) for split in splits) == 8


def write_idx(path, images):
  """An IDX file of uint8 `images` (N, H, W), gzipped when path ends in .gz."""
  raw = struct.pack('>4I', 0x803, *images.shape) + images.astype(np.uint8).tobytes()
  path.write_bytes(gzip.compress(raw, mtime=0) if path.suffix == '.gz' else raw)
  return path


def damage_idx(path, how):
  """Damages the IDX file `path`: its deflate data, gzip trailer, header or pixel count."""
  raw = bytearray(path.read_bytes())
  if how == 'corrupt deflate data':
    raw[10] |= 0b110  # the first block's type: 3, which deflate reserves
  elif how == 'truncated gzip':
    del raw[-20:]
  elif how == 'gzip checksum':
    raw[-6] ^= 1
  elif how == 'truncated header':
    del raw[10:]
  elif how == 'labels':
    raw[:16] = struct.pack('>4I', 0x801, 0, 0, 0)
  elif how == 'gzipped':
    raw = bytearray(gzip.compress(raw, mtime=0))
  elif how == 'no pixels':
    raw = bytearray(struct.pack('>4I', 0x803, 50, 0, 0))
  elif how == 'no images':
    raw = bytearray(struct.pack('>4I', 0x803, 0, 8, 8))
  path.write_bytes(bytes(raw))


@pytest.mark.parametrize('how,message', [
    ('corrupt deflate data', 'cannot be read (Error -3 while decompressing data: invalid block type'),
    ('truncated gzip', 'cannot be read (Compressed file ended before the end-of-stream marker'),
    ('gzip checksum', 'cannot be read (CRC check failed'),
    ('truncated header', 'has 10 bytes, too few for the 16 of an IDX header of images'),
    ('labels', 'is not an IDX file of uint8 images (its magic number is 0x00000801, not 0x00000803)'),
    ('gzipped', 'is not an IDX file of uint8 images (its magic number is 0x1f8b0800, not 0x00000803)'
     ': it is gzipped, so its name must end in .gz'),
    ('no pixels', 'holds 50 images of 0x0 pixels: use a file of at least one image of at least 1x1'),
    ('no images', 'holds 0 images of 8x8 pixels'),
    ('a folder', 'cannot be read (Is a directory)'),
])
def test_a_damaged_or_empty_idx_file_is_named_in_one_line(tmp_path, how, message):
  rng = np.random.default_rng(0)
  suffix = '.gz' if how in ('corrupt deflate data', 'truncated gzip', 'gzip checksum') else ''
  path = tmp_path / f'train-images-idx3-ubyte{suffix}'
  write_idx(tmp_path / 't10k-images-idx3-ubyte', rng.integers(0, 256, (10, 8, 8)))
  if how == 'a folder':
    path.mkdir()
  else:
    damage_idx(write_idx(path, rng.integers(0, 256, (50, 8, 8))), how)
  with pytest.raises(UserError, match=re.escape(f'data file {path} {message}')) as error:
    data.load(data_config('idx', path=str(tmp_path)), seed=0)
  assert '\n' not in str(error.value)


def test_a_folder_at_the_cache_files_path_is_refused_before_decoding(tmp_path, monkeypatch):
  config = data_config('images', path=str(write_images(tmp_path / 'x', 5)),
                       cache_dir=str(tmp_path / 'cache'))
  file = cache.path(images.source(sorted((tmp_path / 'x').iterdir()), 0, 0), 'images',
                    config.cache_dir)
  file.mkdir(parents=True)
  decoded = counting_decodes(monkeypatch)
  with pytest.raises(UserError, match=re.escape(
      f'the decoded cache of images would be written to {file}, which is not a file: remove what '
      'is there, or set data.cache_dir to a writable folder with room, or to none')):
    data.load(config, seed=0)
  assert not decoded


@pytest.mark.parametrize('call,error', [
    ('open_memmap', PermissionError(13, 'Permission denied')),  # a read-only folder, even for root
    ('posix_fallocate', OSError(28, 'No space left on device')),  # a disk filled since the check
])
def test_a_cache_file_that_cannot_be_created_is_refused_in_one_line(tmp_path, monkeypatch, call,
                                                                     error):
  config = data_config('images', path=str(write_images(tmp_path / 'x', 5)),
                       cache_dir=str(tmp_path / 'cache'))
  def fail(*args, **kwargs):
    raise error
  monkeypatch.setattr(np.lib.format if call == 'open_memmap' else os, call, fail)
  with pytest.raises(UserError, match=re.escape(
      f'the decoded cache of images cannot be written to {tmp_path / "cache"}')) as error_info:
    data.load(config, seed=0)
  assert (f'({error.strerror}): set data.cache_dir to a writable folder with room'
          in str(error_info.value))
  assert not list((tmp_path / 'cache').iterdir())


def test_a_damaged_image_in_a_decode_worker_ends_the_command_line_with_one_line(tmp_path):
  folder = write_images(tmp_path / 'x', 5, size=(16, 16))
  damage(folder / '003.png', 'truncated PNG')
  result = run_main('--config=configs/gauss_multi.py', '--config.data.name=images',
                    f'--config.data.path={folder}', '--config.data.num_workers=1',
                    f'--config.data.cache_dir={tmp_path / "cache"}', f'--workdir={tmp_path / "run"}')
  assert result.returncode == 2
  assert result.stderr == (
      f'error: data file {folder / "003.png"} cannot be read (Truncated File Read): replace it '
      'with a whole PNG or JPEG image, or remove it\n')
