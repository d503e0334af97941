"""Sparse-reconstruction curve, uncertainty, figures and TensorBoard events of a trained run.

One tiny single-decoder run and its baseline are trained once, by executing
the notebook experiments/mtvae_colab.ipynb at a tiny size; the tests read
what it wrote.
"""
import json
import struct
import subprocess
import sys

import jax.numpy as jnp
import nbclient
import nbformat
import numpy as np
import pytest

from conftest import device_env
from conftest import ROOT
from conftest import small_config
from mtvae_jax import evaluation
from mtvae_jax.errors import UserError

NOTEBOOK = ROOT / 'experiments' / 'mtvae_colab.ipynb'
FIGURES = ('reconstructions', 'losses', 'sampling_types', 'curve', 'uncertainty')
TINY = {'gaussian.hidden_sizes': (8, 16), 'gaussian.latent_dim': 4, 'train.batch_size': 64,
        'mask.power_law_exponent': 5.0}  # a low exponent: many observed pixels in 3 epochs


def execute_notebook(workdir):
  """The notebook with its parameters cell set to a tiny single-decoder run, executed."""
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  (parameters,) = [c for c in notebook.cells if 'parameters' in c.metadata.get('tags', [])]
  parameters.source = (f"MODEL = 'gaussian'\nMETHOD = 'single'\nNUM_EPOCHS = 3\n"
                       f'WORKDIR = {str(workdir)!r}\nOVERRIDES = {TINY!r}')
  nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(NOTEBOOK.parent)}}).execute()
  return notebook


@pytest.fixture(scope='module')
def env():
  return device_env()


@pytest.fixture(scope='module')
def notebook_run(tmp_path_factory, env):
  """(executed notebook, the single run's directory, the baseline's directory)."""
  workdir = tmp_path_factory.mktemp('notebook')
  with pytest.MonkeyPatch.context() as patch:
    for name, value in env.items():  # the kernel's environment
      patch.setenv(name, value)
    notebook = execute_notebook(workdir)
  return notebook, workdir / 'gaussian_single', workdir / 'gaussian_none'


def test_notebook_trains_and_shows_every_figure(notebook_run):
  notebook, run_dir, baseline_dir = notebook_run
  images = [o for c in notebook.cells if c.cell_type == 'code' for o in c.outputs
            if 'image/png' in o.get('data', {})]
  assert len(images) == len(FIGURES)
  for workdir in (run_dir, baseline_dir):
    assert np.isfinite(json.loads((workdir / 'metrics.json').read_text())['recon_loss'])


def test_curve_error_with_many_observed_pixels_is_below_error_with_none(notebook_run):
  curve = json.loads((notebook_run[1] / 'curve.json').read_text())
  assert curve['num_pixels'] == [0, 1, 2, 4, 8, 16, 32, 64]
  assert set(curve['errors']) == {'exact', 'uniform', 'gaussian'}
  for errors in curve['errors'].values():
    assert max(errors[-3:]) < errors[0]


def test_curve_with_no_pixels_is_the_single_decoders_unconditioned_error(notebook_run):
  curve = json.loads((notebook_run[1] / 'curve.json').read_text())
  baseline = json.loads((notebook_run[2] / 'metrics.json').read_text())
  for errors in curve['errors'].values():
    assert errors[0] == pytest.approx(curve['unconditioned'], rel=1e-5)
  assert curve['baseline'] == baseline['recon_loss']


def test_uncertainty_statistics_are_in_their_ranges(notebook_run):
  result = json.loads((notebook_run[1] / 'uncertainty.json').read_text())
  assert 0.0 <= result['coverage_2std'] <= 1.0
  assert -1.0 <= result['std_error_correlation'] <= 1.0
  assert result['mean_std'] > 0.0
  assert 0.0 < result['mean_squared_error'] <= result['mean_abs_error'] <= 1.0
  assert (result['num_samples'], result['num_pixels'], result['num_images']) == (32, 16, 180)


@pytest.mark.parametrize('name', FIGURES)
def test_each_figure_file_is_written_and_non_empty(notebook_run, name):
  data = (notebook_run[1] / 'figures' / f'{name}.png').read_bytes()
  assert data.startswith(b'\x89PNG') and len(data) > 2000


def read_events(path):
  """Event protos of a TensorBoard event file (TFRecord: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2
  data, position = path.read_bytes(), 0
  while position < len(data):
    (length,) = struct.unpack('<Q', data[position:position + 8])
    yield event_pb2.Event.FromString(data[position + 12:position + 12 + length])
    position += 12 + length + 4


def test_training_writes_tensorboard_scalars_and_image_grids(notebook_run):
  (path,) = notebook_run[1].glob('events.out.tfevents.*')
  tags = {}
  for event in read_events(path):
    for value in event.summary.value:
      tags.setdefault(value.tag, []).append(event.step)
  assert tags['train/loss'] == tags['val/recon_cond_loss'] == [1, 2, 3]
  assert tags['reconstructions'] == [1, 2]  # epochs 1, 2, 4, ...: powers of two


def test_evaluate_from_the_command_line_draws_a_baselines_figures(notebook_run, env):
  baseline_dir = notebook_run[2]
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.evaluate', f'--workdir={baseline_dir}'],
      cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert result.returncode == 0, result.stderr
  assert 'curve and uncertainty skipped: they need a conditioned decoder' in result.stdout
  assert sorted(p.name for p in (baseline_dir / 'figures').iterdir()) == [
      'losses.png', 'reconstructions.png', 'sampling_types.png']
  assert not (baseline_dir / 'curve.json').exists()


@pytest.mark.parametrize('args,message', [
    (['--workdir=/nonexistent'], "workdir '/nonexistent' holds no finished run"),
    ([], '--workdir is required'),
])
def test_evaluate_bad_input_exits_with_one_line(args, message, env):
  result = subprocess.run([sys.executable, '-m', 'experiments.evaluate', *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
  assert result.returncode == 2
  assert result.stderr.strip().count('\n') == 0, result.stderr
  assert message in result.stderr


def test_too_few_prior_samples_are_refused(tmp_path):
  with pytest.raises(UserError, match='--num_samples=1 is not allowed: use an integer >= 2'):
    evaluation.evaluate_run(tmp_path, num_samples=1)


def test_baseline_of_another_model_or_test_split_is_refused():
  config = small_config('gaussian', 'multi')
  other = json.loads(small_config('vq', 'none').to_json())
  with pytest.raises(UserError, match="--baseline='b' differs from the run at model"):
    evaluation.check_baseline(config, other, 'b')
  other = json.loads(small_config('gaussian', 'none').to_json())
  other['seed'] = 3
  with pytest.raises(UserError, match='differs from the run at seed'):
    evaluation.check_baseline(config, other, 'b')
  other['seed'] = config.seed
  evaluation.check_baseline(config, other, 'b')


def test_curve_counts_go_from_none_to_all_pixels_in_powers_of_two():
  assert evaluation.curve_counts(64) == [0, 1, 2, 4, 8, 16, 32, 64]
  assert evaluation.curve_counts(784)[-3:] == [256, 512, 784]
  assert evaluation.curve_counts(1) == [0, 1]


def test_calibration_matches_numpy():
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(3, 4, 4, 1)).astype(np.float32)
  mean = rng.uniform(size=images.shape).astype(np.float32)
  std = rng.uniform(0.05, 0.5, size=images.shape).astype(np.float32)
  mask = (rng.uniform(size=images.shape) < 0.3).astype(np.float32)
  weights = np.array([1.0, 1.0, 0.0], np.float32)  # the last image is padding
  sums = evaluation.calibration_sums(lambda state, x, key: (mask, mean, std), None,
                                     jnp.asarray(images), jnp.asarray(weights), None)
  result = evaluation.calibration({name: float(value) for name, value in sums.items()})
  hidden = (mask[:2] == 0)
  error, spread = np.abs(mean - images)[:2][hidden], std[:2][hidden]
  assert result['mean_squared_error'] == pytest.approx(np.mean(error ** 2), rel=1e-5)
  assert result['mean_abs_error'] == pytest.approx(np.mean(error), rel=1e-5)
  assert result['mean_std'] == pytest.approx(np.mean(spread), rel=1e-5)
  assert result['coverage_2std'] == pytest.approx(np.mean(error <= 2 * spread), rel=1e-5)
  assert result['std_error_correlation'] == pytest.approx(np.corrcoef(spread, error)[0, 1],
                                                          rel=1e-3)
