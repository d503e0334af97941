"""Crash safety: exact resume after SIGKILL or SIGTERM, and damaged checkpoints."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from conftest import compilations, latest_steps, small, small_config, STEPS_PER_EPOCH
from mtvae_jax import train
from mtvae_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
# small(small_config) on the command line
CLI_ARGS = ['--config=configs/gauss_multi.py', '--config.train.num_epochs=2',
            '--config.train.checkpoint_every_steps=5', '--config.gaussian.hidden_sizes=(8,16)',
            '--config.gaussian.latent_dim=4', '--config.train.batch_size=64']


def cli(workdir):
  return subprocess.Popen([sys.executable, '-m', 'experiments.main', *CLI_ARGS,
                           f'--workdir={workdir}'], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_run_killed_mid_epoch_resumes_to_identical_metrics(tmp_path, reference):
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
  assert json.loads((tmp_path / 'killed' / 'metrics.json').read_text()) == reference
  history = [json.loads(l) for l in (tmp_path / 'killed' / 'history.jsonl').read_text().splitlines()]
  assert [h['epoch'] for h in history] == [1, 2]


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  """(metrics.json, compilations()) of an uninterrupted run of `small(...)`."""
  with compilations() as counts:
    metrics = train.train_and_evaluate(small(small_config), tmp_path_factory.mktemp('reference'))
  return metrics, counts


@pytest.fixture
def reference(reference_run):
  return reference_run[0]


def test_a_run_compiles_its_train_step_and_its_eval_step_once(reference_run):
  _, (compiled, _) = reference_run
  assert compiled['jit(guarded_step)'] == compiled['jit(eval_step)'] == 1, compiled


def test_sigterm_checkpoints_then_rerun_resumes_exactly(make_config, tmp_path, sigterm_after,
                                                       monkeypatch, reference):
  config = small(make_config)
  sigterm_after(STEPS_PER_EPOCH + 7)
  with pytest.raises(UserError, match='stopped by SIGTERM at epoch 2, step 8'):
    train.train_and_evaluate(config, tmp_path / 'run')
  assert (STEPS_PER_EPOCH + 8) in latest_steps(tmp_path / 'run')
  monkeypatch.undo()
  with compilations() as (compiled, cached):
    assert train.train_and_evaluate(config, tmp_path / 'run') == reference
  # once each, and the same config's train step comes from the persistent compilation cache
  assert compiled['jit(guarded_step)'] == compiled['jit(eval_step)'] == 1, compiled
  assert cached['jit_guarded_step'] == 1, cached


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


def test_newest_checkpoint_with_a_flipped_bit_fails_its_checksum_and_the_previous_is_used(
    make_config, tmp_path, capsys, sigterm_after, monkeypatch, reference):
  config = small(make_config)
  sigterm_after(STEPS_PER_EPOCH + 4)
  with pytest.raises(UserError, match='stopped by SIGTERM'):
    train.train_and_evaluate(config, tmp_path / 'run')
  monkeypatch.undo()
  *_, previous, newest = latest_steps(tmp_path / 'run')
  state = tmp_path / 'run' / 'checkpoints' / 'latest' / str(newest) / 'state'
  largest = max((f for f in state.rglob('*') if f.is_file()), key=lambda f: f.stat().st_size)
  data = bytearray(largest.read_bytes())
  data[len(data) // 2] ^= 1
  largest.write_bytes(bytes(data))
  capsys.readouterr()
  assert train.train_and_evaluate(config, tmp_path / 'run') == reference
  captured = capsys.readouterr()
  assert f'latest/{newest} is unreadable (SHA-256 of state/' in captured.err
  assert f'resuming at epoch 2, step {previous - STEPS_PER_EPOCH}' in captured.out
