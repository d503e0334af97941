"""The command line as a user runs it: python -m experiments.main."""
import gzip
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FASHION = pathlib.Path('/usr/share/datasets/fashion-mnist')
SMALL = ['--config.gaussian.hidden_sizes=(8,16)', '--config.gaussian.latent_dim=4',
         '--config.vq.hidden_sizes=(8,16)', '--config.vq.num_embeddings=16',
         '--config.vq.embedding_dim=4', '--config.train.batch_size=64']


def main(*args, cwd=ROOT):
  return subprocess.run([sys.executable, '-m', 'experiments.main', *args], cwd=cwd,
                        capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)))


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
                '--config.train.batch_size=256', *SMALL[:-1])
  assert result.returncode == 0, result.stderr
  assert '(28, 28, 1): 54000 train, 6000 validation, 10000 test' in result.stdout
  assert json.loads((tmp_path / 'metrics.json').read_text())['recon_loss'] < 0.1


BAD_INPUTS = [
    (['--config.model=resnet'], "config.model='resnet' is not allowed: use one of gaussian, vq"),
    (['--config.method=triple'], "config.method='triple' is not allowed: use one of none, multi"),
    (['--config.data.name=imagenet'], "config.data.name='imagenet' is not allowed"),
    (['--config.mask.sampling=poisson'], "config.mask.sampling='poisson' is not allowed"),
    (['--config.mask.num_pixels=-1'], 'config.mask.num_pixels=-1 is not allowed'),
    (['--config.mask.num_pixels=65'], 'config.mask.num_pixels=65 is not allowed: use a count from 0 to 64'),
    (['--config.mask.power_law_exponent=0'], 'config.mask.power_law_exponent=0.0 is not allowed'),
    (['--config.mask.power_law_exponent=-3'], 'config.mask.power_law_exponent=-3.0 is not allowed'),
    (['--config.data.name=idx', '--config.data.path=/nonexistent'], "data.path='/nonexistent' is not a folder"),
    (['--config.mask.nokey=1'], 'config key config.mask.nokey does not exist'),
    (['--config.train.num_epochs=two'], 'flag --config.train.num_epochs=two'),
]


@pytest.mark.parametrize('args,message', BAD_INPUTS)
def test_bad_input_exits_with_one_line(args, message, tmp_path):
  result = main('--config=configs/gauss_multi.py', f'--workdir={tmp_path / "run"}', *args)
  assert result.returncode == 2
  assert result.stderr.strip().count('\n') == 0, result.stderr
  assert message in result.stderr
  assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('arg,message', [
    ('configs/gauss_multi.py:digits,3', 'configuration 3 is not allowed for model=gaussian'),
    ('configs/missing.py', 'cannot load the config file'),
])
def test_bad_config_argument_exits_with_one_line(arg, message):
  result = main(f'--config={arg}')
  assert result.returncode == 2
  assert message in result.stderr and result.stderr.strip().count('\n') == 0


def test_corrupt_data_file_is_named(tmp_path):
  (tmp_path / 'train-images-idx3-ubyte').write_bytes(b'not an idx file at all')
  result = main('--config=configs/gauss_base.py:idx', f'--config.data.path={tmp_path}',
                f'--workdir={tmp_path / "run"}')
  assert result.returncode == 2
  assert 'train-images-idx3-ubyte is not an IDX file' in result.stderr
  assert result.stderr.strip().count('\n') == 0


def test_finished_run_of_another_config_is_not_overwritten(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'model': 'vq'}))
  (tmp_path / 'metrics.json').write_text('{"loss": 1.0}')
  result = main('--config=configs/gauss_multi.py', f'--workdir={tmp_path}')
  assert result.returncode == 2
  assert 'holds a run of another config' in result.stderr
  assert (tmp_path / 'metrics.json').read_text() == '{"loss": 1.0}'
