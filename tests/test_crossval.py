"""Cross-validation (experiments.crossval) and the merged table (experiments.report)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import device_env
from conftest import ROOT
from conftest import small_config
from mtvae_jax.errors import UserError
from mtvae_jax.thesis import crossval
from mtvae_jax.thesis import stats

SMALL = ['--config.gaussian.hidden_sizes=(8,16)', '--config.gaussian.latent_dim=4',
         '--config.train.batch_size=64', '--config.train.num_epochs=1']
FOLDS = [{'loss': 1.0, 'recon_loss': 0.5, 'kl_loss': 3.0, 'num_params': 100},
         {'loss': 2.0, 'recon_loss': 0.25, 'kl_loss': 5.0, 'num_params': 100},
         {'loss': 4.5, 'recon_loss': 0.75, 'kl_loss': 4.0, 'num_params': 100, 'only_here': 1.0}]


@pytest.fixture(scope='module')
def command():
  """Runs python -m experiments.<module> <args>."""
  env = device_env()
  return lambda module, *args: subprocess.run(
      [sys.executable, '-m', f'experiments.{module}', *args], cwd=ROOT, capture_output=True,
      text=True, timeout=600, env=env)


def test_aggregate_is_numpys_mean_and_sample_std_over_folds():
  result = stats.aggregate(FOLDS)
  for name in ('loss', 'recon_loss', 'kl_loss', 'num_params'):
    values = np.array([fold[name] for fold in FOLDS])
    assert result['mean'][name] == pytest.approx(np.mean(values))
    assert result['std'][name] == pytest.approx(np.std(values, ddof=1))
  assert 'only_here' not in result['mean']  # only metrics every fold has


def test_table_row_has_mean_plus_minus_std_and_dashes_for_missing_metrics():
  summary = crossval.summarize(small_config('gaussian', 'none'), FOLDS)
  header, rule, row = crossval.markdown_table([summary]).splitlines()
  cells = [cell.strip() for cell in row.strip('|').split('|')]
  assert len(cells) == len(crossval.COLUMNS) == header.count('|') - 1 == rule.count('---')
  assert cells[:5] == ['Gaussian VAE', 'custom', '-', '-', '100']
  assert cells[5] == f'0.5 ± {np.std([0.5, 0.25, 0.75], ddof=1):.1e}'
  assert cells[6] == '-'  # no conditioned decoder
  assert cells[7] == f'4 ± {np.std([3.0, 5.0, 4.0], ddof=1):.1e}'
  assert cells[8] == '3'


@pytest.mark.parametrize('model,method,changes,expected', [
    ('gaussian', 'multi', {}, 'exact, k=16'),
    ('vq', 'single', {}, 'uniform, power law a=40'),
    ('vq', 'multi', {'loss.balancing': 'softadapt', 'mask.sampling': 'uniform'},
     'SoftAdapt, uniform, k=16'),
    ('gaussian', 'multi', {'conditioning': 'spatial'}, 'exact, k=16, spatial m'),
    ('gaussian', 'none', {'conditioning': 'spatial'}, '-'),
])
def test_parameters_column_names_balancing_sampling_and_count(model, method, changes, expected):
  config = small_config(model, method)
  config.update_from_flattened_dict(changes)
  assert crossval.parameters(config) == expected


def test_configuration_column_is_the_thesis_number_unless_the_network_changed():
  from mtvae_jax import config as config_lib
  assert crossval.configuration(config_lib.base_config('vq', 'multi', '3')) == '3'
  assert crossval.configuration(small_config('vq', 'multi')) == 'custom'


@pytest.fixture(scope='module')
def crossval_dir(tmp_path_factory, command):
  """A 2-fold cross-validation of a tiny multidecoder VAE, one epoch a fold, from the CLI."""
  workdir = tmp_path_factory.mktemp('crossval')
  result = command('crossval', '--config=configs/gauss_multi.py', f'--workdir={workdir}',
                   '--folds=2', *SMALL)
  assert result.returncode == 0, result.stderr
  return workdir


def test_crossval_writes_per_fold_and_aggregated_metrics(crossval_dir):
  summary = json.loads((crossval_dir / 'crossval.json').read_text())
  assert len(summary['folds']) == 2
  for index, fold in enumerate(summary['folds']):
    assert fold == json.loads((crossval_dir / f'fold_{index}' / 'metrics.json').read_text())
    config = json.loads((crossval_dir / f'fold_{index}' / 'config.json').read_text())
    assert (config['data']['num_folds'], config['data']['fold']) == (2, index)
  assert summary['folds'][0]['recon_loss'] != summary['folds'][1]['recon_loss']
  assert summary['mean']['recon_cond_loss'] == pytest.approx(
      np.mean([fold['recon_cond_loss'] for fold in summary['folds']]))
  table = (crossval_dir / 'crossval.md').read_text()
  assert table == crossval.markdown_table([summary])
  assert table.splitlines()[2].count('±') == 3


def fold_files(crossval_dir):
  """{path: modification time} of the folds' files but their locks (taken by every run)."""
  return {p: p.stat().st_mtime_ns for p in crossval_dir.glob('fold_*/*') if p.name != '.lock'}


def test_crossval_keeps_finished_folds_instead_of_retraining(crossval_dir, command):
  before = fold_files(crossval_dir)
  summary = (crossval_dir / 'crossval.json').read_text()
  (crossval_dir / 'crossval.json').unlink()
  result = command('crossval', '--config=configs/gauss_multi.py', f'--workdir={crossval_dir}',
                   '--folds=2', *SMALL)
  assert result.returncode == 0, result.stderr
  assert result.stdout.count('holds a finished run of this config') == 2
  assert fold_files(crossval_dir) == before
  assert (crossval_dir / 'crossval.json').read_text() == summary


def test_report_merges_directories_into_one_table(crossval_dir, command, tmp_path):
  other = tmp_path / 'single'
  other.mkdir()
  (other / 'crossval.json').write_text(json.dumps(
      crossval.summarize(small_config('gaussian', 'single'), FOLDS)))
  out = tmp_path / 'table.md'
  result = command('report', str(crossval_dir), str(other), f'--out={out}')
  assert result.returncode == 0, result.stderr
  lines = out.read_text().splitlines()
  assert len(lines) == 4 and result.stdout == out.read_text()
  assert '| Multi decoder | exact, k=16 |' in lines[2]
  assert '| Single decoder | uniform, power law a=40 |' in lines[3]


@pytest.mark.parametrize('module,args,message', [
    ('crossval', ['--config=configs/gauss_multi.py', '--folds=1'], '--folds=1 is not allowed'),
    ('report', [], 'give one or more directories'),
])
def test_bad_input_exits_with_one_line(module, args, message, command, tmp_path):
  result = command(module, *args, f'--workdir={tmp_path}')
  assert result.returncode == 2
  assert result.stderr.strip().count('\n') == 0, result.stderr
  assert message in result.stderr


def test_report_of_a_directory_without_crossval_json_is_refused(tmp_path):
  with pytest.raises(UserError, match=f"'{tmp_path}' holds no crossval.json: run python -m "
                     'experiments.crossval'):
    crossval.report([tmp_path])


def test_report_to_an_unwritable_file_is_refused(crossval_dir, tmp_path):
  with pytest.raises(UserError, match="--out='/nonexistent/t.md' cannot be written"):
    crossval.report([crossval_dir], '/nonexistent/t.md')
