"""Training from the command line as a user runs it: python -m experiments.main."""
import json
import pathlib

import pytest

from conftest import run_main as main

FASHION = pathlib.Path('/usr/share/datasets/fashion-mnist')
SMALL = ['--config.gaussian.hidden_sizes=(8,16)', '--config.gaussian.latent_dim=4',
         '--config.vq.hidden_sizes=(8,16)', '--config.vq.num_embeddings=16',
         '--config.vq.embedding_dim=4', '--config.train.batch_size=64']


@pytest.mark.skipif(not FASHION.is_dir(), reason='Debian package dataset-fashion-mnist not installed')
def test_trains_on_the_system_fashion_mnist_files(tmp_path):
  result = main('--config=configs/vq_multi.py:idx', f'--workdir={tmp_path}',
                f'--config.data.path={FASHION}', '--config.train.num_epochs=1',
                '--config.data.max_images=7000', *SMALL)
  assert result.returncode == 0, result.stderr
  # 7000 of the 60000 + 10000 images in the official proportions; a tenth of the 6000 validates
  assert '(28, 28, 1): 5400 train, 600 validation, 1000 test' in result.stdout
  assert json.loads((tmp_path / 'metrics.json').read_text())['recon_loss'] < 0.1
