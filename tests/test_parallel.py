"""Data parallel training (mtvae_jax.parallel): 4 CPU devices, and 2 processes of 2 devices
each, train the same model as 1 device with the same global batch."""
import json
import pathlib
import socket
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

from conftest import ROOT
from conftest import device_env
from conftest import latest_steps
from conftest import run_main
from mtvae_jax import config as config_lib
from mtvae_jax import parallel
from mtvae_jax.errors import UserError

SMALL = ['--config=configs/gauss_multi.py', '--config.gaussian.hidden_sizes=(8,16)',
         '--config.gaussian.latent_dim=4', '--config.train.batch_size=64',
         '--config.train.num_epochs=2', '--config.train.checkpoint_every_steps=10']


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def train_steps(devices, out, *args, folder='', processes=1):
  """Losses and final state of tests/parallel_steps.py on `processes` processes of `devices`
  devices each (the same in every process)."""
  address = f'localhost:{free_port()}'
  runs = [subprocess.Popen(
      [sys.executable, str(ROOT / 'tests' / 'parallel_steps.py'), *args, str(out), folder],
      cwd=ROOT,
      env=dict(device_env(devices), **({} if processes == 1 else {
          'JAX_COORDINATOR_ADDRESS': address, 'JAX_NUM_PROCESSES': str(processes),
          'JAX_PROCESS_ID': str(i)})))
      for i in range(processes)]
  assert [run.wait(timeout=600) for run in runs] == [0] * processes
  return dict(np.load(out))


def assert_same_steps(one, other):
  """Same losses, SoftAdapt weights, parameters and batch-norm statistics, to float32 rounding."""
  assert one.keys() == other.keys()
  for name in one:
    if name.startswith(('loss_', "['weights']")) or name.endswith("['var']"):
      # Global batch statistics and the same masks and noise per image.
      np.testing.assert_allclose(other[name], one[name], rtol=2e-5, atol=1e-7, err_msg=name)
    elif name.endswith("['mean']"):
      # The running means follow the biases below; per-device statistics would be off by ~0.05.
      np.testing.assert_allclose(other[name], one[name], atol=5e-3, err_msg=name)
    elif not (name.endswith("['bias']") and ('Conv_' in name or 'ConvTranspose_' in name)):
      np.testing.assert_allclose(other[name], one[name], rtol=1e-4, atol=1e-6, err_msg=name)
    # A bias right before a batch norm has zero gradient up to rounding, which AdamW scales up
    # to steps of up to the learning rate: those biases are noise on any device count.


def test_four_devices_take_the_same_steps_as_one(tmp_path):
  args = ('gaussian', 'multi', 'softadapt', '5')
  one, four = (train_steps(n, tmp_path / f'{n}.npz', *args) for n in (1, 4))
  assert sum(name.startswith('loss_4/') for name in one) == 4  # five steps recorded
  assert_same_steps(one, four)


def test_two_processes_each_streaming_its_share_take_the_same_steps_as_one(tmp_path):
  from sklearn.datasets import load_digits
  folder = tmp_path / 'digits'
  folder.mkdir()
  for i, image in enumerate(load_digits().images[:400]):
    Image.fromarray((image * 255 / 16).astype(np.uint8)).save(folder / f'{i:03d}.png')
  args = ('vq', 'single', 'fixed', '3')
  one = train_steps(1, tmp_path / 'one.npz', *args, folder=str(folder))
  two = train_steps(2, tmp_path / 'two.npz', *args, folder=str(folder), processes=2)
  assert sum(name.startswith('loss_2/') for name in one) == 3
  assert_same_steps(one, two)


@pytest.fixture(scope='module')
def one_device_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('one')
  result = run_main(*SMALL, f'--workdir={workdir}', devices=1)
  assert result.returncode == 0, result.stderr
  return workdir


def assert_same_run(workdir, reference, runs=1):
  """workdir's run ended as `reference`'s; `runs` commands (each writes one event file) made it."""
  metrics, expected = (json.loads((w / 'metrics.json').read_text()) for w in (workdir, reference))
  assert metrics['best_epoch'] == expected['best_epoch']
  # z_use is a small difference of two errors: rounding moves it by ~1e-5 with the device count.
  assert metrics == pytest.approx(expected, rel=1e-3, abs=1e-4)
  history = (workdir / 'history.jsonl').read_text().splitlines()
  assert [json.loads(line)['epoch'] for line in history] == [1, 2]  # written once, by process 0
  assert len(list(workdir.glob('events.out.tfevents.*'))) == runs


def test_two_processes_train_stop_together_and_resume_like_one(one_device_run, tmp_path):
  """Two processes of 2 devices each; SIGTERM to process 1 stops both after a checkpoint; one
  process on 4 devices resumes the run from the command line and ends with the metrics of the
  1-device run."""
  address = f'localhost:{free_port()}'
  processes = [subprocess.Popen(
      [sys.executable, '-m', 'experiments.main', *SMALL, f'--workdir={tmp_path}',
       f'--config.distributed.coordinator_address={address}',
       '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}'],
      cwd=ROOT, env=device_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  deadline = time.monotonic() + 300
  while not latest_steps(tmp_path) and time.monotonic() < deadline:
    time.sleep(0.2)
  processes[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=300) for p in processes]
  assert [p.returncode for p in processes] == [2, 2], outputs
  stopped = [err.strip().splitlines()[-1] for _, err in outputs]
  assert stopped[0].startswith('error: stopped by a signal to another process at epoch ')
  assert stopped[1].startswith('error: stopped by SIGTERM at epoch ')
  assert stopped[0].split(':')[1] == stopped[1].split(':')[1].replace('SIGTERM', 'a signal to '
                                                                      'another process')
  assert not (tmp_path / 'metrics.json').exists()
  # Process 0 writes an event file once it finishes an epoch; the resumed run writes another.
  finished_epoch = int(stopped[1].rsplit('at epoch ', 1)[1].split()[0].rstrip(':;,.')) > 1
  assert len(list(tmp_path.glob('events.out.tfevents.*'))) == finished_epoch

  result = run_main(*SMALL, f'--workdir={tmp_path}', devices=4)
  assert result.returncode == 0, result.stderr
  assert 'resuming at epoch' in result.stdout
  assert_same_run(tmp_path, one_device_run, runs=1 + finished_epoch)


def test_batch_size_the_devices_cannot_split_is_one_line(tmp_path):
  result = run_main(*SMALL, '--config.train.batch_size=62', f'--workdir={tmp_path}', devices=4)
  assert result.returncode == 2
  assert result.stderr.strip() == ('error: config.train.batch_size=62 is not allowed: it must '
                                   'split evenly over the 4 devices, use a multiple of 4')
  assert not pathlib.Path(tmp_path, 'config.json').exists()


def test_distributed_settings_come_from_the_config_then_the_environment(monkeypatch):
  config = config_lib.base_config('gaussian', 'multi').distributed
  for variable in parallel.ENV.values():
    monkeypatch.delenv(variable, raising=False)
  assert parallel.settings(config) == dict.fromkeys(parallel.ENV)  # one process
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'host0:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
  config.process_id = 3
  assert parallel.settings(config) == {'coordinator_address': 'host0:1234', 'num_processes': 4,
                                       'process_id': 3}
  monkeypatch.setenv('JAX_NUM_PROCESSES', 'four')
  with pytest.raises(UserError, match=r"^environment variable JAX_NUM_PROCESSES='four' is not "
                                      'allowed: use an integer$'):
    parallel.settings(config)


def test_process_id_outside_the_process_count_is_refused():
  config = config_lib.base_config('gaussian', 'multi')
  config.distributed.update(num_processes=2, process_id=2)
  with pytest.raises(UserError, match=r'^config.distributed.process_id=2 is not allowed: use an '
                                      'integer from 0 to distributed.num_processes - 1'):
    config_lib.validate(config)
