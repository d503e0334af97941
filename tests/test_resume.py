"""Crash safety: exact resume after SIGKILL or SIGTERM, and damaged checkpoints."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from conftest import latest_steps, small, small_config
from mtvae_jax import train
from mtvae_jax.data import pipeline
from mtvae_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_IMAGES = 1455  # digits
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


@pytest.fixture
def sigterm_after(monkeypatch):
  """Makes the training loop receive SIGTERM after `n` training batches."""
  def arm(n):
    feed = pipeline.batches
    def batches(images, *args, **kwargs):
      for batch in feed(images, *args, **kwargs):
        if len(images) == TRAIN_IMAGES:  # the training split, not evaluation
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
