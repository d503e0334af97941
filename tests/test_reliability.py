"""Crash safety: exact resume after SIGKILL or SIGTERM, damaged checkpoints, non-finite losses."""
import collections
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import small_config
from mtvae_jax import checkpoints
from mtvae_jax import data
from mtvae_jax import train
from mtvae_jax.data import pipeline
from mtvae_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 22  # 1455 digits training images in batches of 64
CLI_ARGS = ['--config=configs/vq_multi.py', '--config.train.num_epochs=2',
            '--config.train.checkpoint_every_steps=3', '--config.vq.hidden_sizes=(8,16)',
            '--config.vq.num_embeddings=16', '--config.vq.embedding_dim=4',
            '--config.train.batch_size=64']


def cli(workdir):
  return subprocess.Popen([sys.executable, '-m', 'experiments.main', *CLI_ARGS,
                           f'--workdir={workdir}'], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def latest_steps(workdir):
  folder = pathlib.Path(workdir) / 'checkpoints' / 'latest'
  return sorted(int(p.name) for p in folder.glob('*') if p.name.isdigit()) if folder.is_dir() else []


def test_run_killed_mid_epoch_resumes_to_identical_metrics(tmp_path):
  reference = cli(tmp_path / 'reference')
  killed = cli(tmp_path / 'killed')
  deadline = time.time() + 300
  while not [s for s in latest_steps(tmp_path / 'killed') if s > STEPS_PER_EPOCH]:
    assert killed.poll() is None and time.time() < deadline, killed.communicate()
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert not (tmp_path / 'killed' / 'metrics.json').exists()
  resumed = cli(tmp_path / 'killed')
  out, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err
  assert 'resuming at epoch 2' in out
  assert reference.wait(timeout=300) == 0
  expected = json.loads((tmp_path / 'reference' / 'metrics.json').read_text())
  assert json.loads((tmp_path / 'killed' / 'metrics.json').read_text()) == expected
  history = [json.loads(l) for l in (tmp_path / 'killed' / 'history.jsonl').read_text().splitlines()]
  assert [h['epoch'] for h in history] == [1, 2]


def small(make_config, **train_keys):
  config = make_config('gaussian', 'multi', num_epochs=2)
  config.train.update(checkpoint_every_steps=3, **train_keys)
  return config


@pytest.fixture
def sigterm_after(monkeypatch):
  """Makes the training loop receive SIGTERM after `n` training batches."""
  def arm(n):
    feed = pipeline.batches
    def batches(images, *args, **kwargs):
      for batch in feed(images, *args, **kwargs):
        if isinstance(images, jax.Array):  # the device-resident training split, not evaluation
          if sigterm_after.count == n:
            os.kill(os.getpid(), signal.SIGTERM)
          sigterm_after.count += 1
        yield batch
    sigterm_after.count = 0
    monkeypatch.setattr(pipeline, 'batches', batches)
  return arm


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """metrics.json of an uninterrupted run of `small(...)`."""
  return train.train_and_evaluate(small(small_config), tmp_path_factory.mktemp('reference'))


def test_sigterm_checkpoints_then_rerun_resumes_exactly(make_config, tmp_path, sigterm_after,
                                                       monkeypatch, reference):
  config = small(make_config)
  sigterm_after(STEPS_PER_EPOCH + 7)
  with pytest.raises(UserError, match='stopped by SIGTERM at epoch 2, step 8'):
    train.train_and_evaluate(config, tmp_path / 'run')
  assert (STEPS_PER_EPOCH + 8) in latest_steps(tmp_path / 'run')
  monkeypatch.undo()
  assert train.train_and_evaluate(config, tmp_path / 'run') == reference


def test_damaged_newest_checkpoint_falls_back_to_the_previous(make_config, tmp_path, capsys,
                                                             sigterm_after, monkeypatch, reference):
  config = small(make_config)
  sigterm_after(STEPS_PER_EPOCH + 4)
  with pytest.raises(UserError, match='stopped by SIGTERM'):
    train.train_and_evaluate(config, tmp_path / 'run')
  monkeypatch.undo()
  *_, previous, newest = latest_steps(tmp_path / 'run')
  for f in (tmp_path / 'run' / 'checkpoints' / 'latest' / str(newest) / 'state').rglob('*'):
    if f.is_file():
      f.write_bytes(b'\0garbage')
  capsys.readouterr()
  assert train.train_and_evaluate(config, tmp_path / 'run') == reference
  captured = capsys.readouterr()
  assert f'latest/{newest} is unreadable' in captured.err
  assert f'resuming at epoch 2, step {previous - STEPS_PER_EPOCH}' in captured.out


def with_nan_image(monkeypatch):
  load = data.load
  def load_with_nan(data_config, seed):
    splits = load(data_config, seed)
    train_images = splits.train.copy()
    train_images[100] = np.nan
    return splits._replace(train=train_images)
  monkeypatch.setattr(data, 'load', load_with_nan)


def test_non_finite_loss_stops_naming_step_and_term_and_keeps_good_checkpoints(
    make_config, tmp_path, monkeypatch):
  with_nan_image(monkeypatch)
  config = small(make_config)
  with pytest.raises(UserError, match=r'non-finite [a-z_]+ at step (\d+): training stopped') as e:
    train.train_and_evaluate(config, tmp_path)
  bad_step = int(str(e.value).split('at step ')[1].split(':')[0])
  order = pipeline.epoch_order(config.seed, 1, 1455, 64)
  assert bad_step == int(np.argmax((order == 100).any(axis=1)))  # the batch holding the NaN image
  assert not (tmp_path / 'metrics.json').exists()
  steps = latest_steps(tmp_path)
  assert steps and max(steps) <= bad_step  # only states from before the failure
  run = train.setup(config)
  _, latest = checkpoints.managers(tmp_path, 3)
  zero = np.zeros((), np.float32)
  template = {'state': run.state,
              'sums': dict.fromkeys(['kl_loss', 'loss', 'recon_cond_loss', 'recon_loss', 'steps'], zero),
              'health': dict.fromkeys(['bad_step', 'bad_term', 'skipped'], np.zeros((), np.int32))}
  tree, _ = checkpoints.restore_latest(latest, template)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(tree['state'].params))


def test_skip_mode_leaves_non_finite_batches_out_and_counts_them(make_config, tmp_path, monkeypatch):
  with_nan_image(monkeypatch)
  config = small(make_config, on_nonfinite='skip')
  result = train.train_and_evaluate(config, tmp_path)
  assert np.isfinite(result['loss'])
  history = [json.loads(l) for l in (tmp_path / 'history.jsonl').read_text().splitlines()]
  assert [h['skipped_steps'] for h in history] == [1, 2]  # the NaN image is in one batch per epoch
  assert all(np.isfinite(h['train/loss']) for h in history)


def test_unwritable_workdir_is_reported_before_training(make_config, tmp_path):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(UserError, match='is not writable'):
    train.train_and_evaluate(make_config('gaussian', 'none'), tmp_path / 'file' / 'run')


def test_full_disk_is_reported_before_training(make_config, tmp_path, monkeypatch):
  usage = collections.namedtuple('usage', 'total used free')
  monkeypatch.setattr(train.shutil, 'disk_usage', lambda path: usage(10, 10, 0))
  with pytest.raises(UserError, match='0 MiB free'):
    train.train_and_evaluate(make_config('gaussian', 'none'), tmp_path)
  assert not (tmp_path / 'history.jsonl').exists()
