"""Training from the command line as a user runs it: python -m experiments.main."""
import gzip
import json
import pathlib

import numpy as np
import pytest

from conftest import run_main as main

FASHION = pathlib.Path('/usr/share/datasets/fashion-mnist')
SMALL = ['--config.gaussian.hidden_sizes=(8,16)', '--config.gaussian.latent_dim=4',
         '--config.vq.hidden_sizes=(8,16)', '--config.vq.num_embeddings=16',
         '--config.vq.embedding_dim=4', '--config.train.batch_size=64']


def write_idx(path, images):
  header = np.array([0x803, *images.shape], '>u4').tobytes()
  with gzip.open(path, 'wb') as f:
    f.write(header + images.astype(np.uint8).tobytes())


@pytest.fixture(scope='module')
def idx_folder(tmp_path_factory):
  """MNIST-format files made from the digits data, upscaled to 16x16."""
  from sklearn.datasets import load_digits
  images = np.kron(load_digits().images, np.ones((2, 2))) * 255 / 16
  folder = tmp_path_factory.mktemp('idx')
  write_idx(folder / 'train-images-idx3-ubyte.gz', images[:1500])
  write_idx(folder / 't10k-images-idx3-ubyte.gz', images[1500:])
  return folder


@pytest.mark.parametrize('config', ['gauss_base', 'gauss_multi', 'gauss_single',
                                    'vq_base', 'vq_multi', 'vq_single'])
def test_each_config_trains_from_the_command_line(config, tmp_path, idx_folder):
  data = (['--config.data.name=idx', f'--config.data.path={idx_folder}']
          if config.startswith('vq') else [])
  result = main(f'--config=configs/{config}.py', f'--workdir={tmp_path}',
                '--config.train.num_epochs=1', *SMALL, *data)
  assert result.returncode == 0, result.stderr
  assert 'epoch 1:' in result.stdout and 'images/s' in result.stdout
  metrics = json.loads((tmp_path / 'metrics.json').read_text())
  regularizer = 'kl_loss' if config.startswith('gauss') else 'vq_loss'
  for key in ('loss', 'recon_loss', regularizer, 'best_epoch'):
    assert np.isfinite(metrics[key])
  assert ('recon_cond_loss' in metrics) == (not config.endswith('base'))
  assert len((tmp_path / 'history.jsonl').read_text().splitlines()) == 1
  assert json.loads((tmp_path / 'config.json').read_text())['data']['name'] == (
      'idx' if data else 'digits')


@pytest.mark.skipif(not FASHION.is_dir(), reason='Debian package dataset-fashion-mnist not installed')
def test_trains_on_the_system_fashion_mnist_files(tmp_path):
  result = main('--config=configs/vq_multi.py:idx', f'--workdir={tmp_path}',
                f'--config.data.path={FASHION}', '--config.train.num_epochs=1',
                '--config.data.max_images=7000', *SMALL)
  assert result.returncode == 0, result.stderr
  # 7000 of the 60000 + 10000 images in the official proportions; a tenth of the 6000 validates
  assert '(28, 28, 1): 5400 train, 600 validation, 1000 test' in result.stdout
  assert json.loads((tmp_path / 'metrics.json').read_text())['recon_loss'] < 0.1
