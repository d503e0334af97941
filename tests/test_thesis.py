"""The thesis grid: its rows and claims, the paired statistics, and the command end to end."""
import json
import math
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats as scipy_stats

from conftest import device_env
from conftest import ROOT
from configs import thesis as thesis_grid
import mtvae_jax
from mtvae_jax.thesis import executors
from mtvae_jax.thesis import report as thesis_report
from mtvae_jax.thesis import runs as thesis
from mtvae_jax.thesis import stats

TINY = ('--folds=2', '--rows=gauss1_base,gauss1_multi_exact', '--config.train.num_epochs=1',
        '--config.train.batch_size=64', '--config.gaussian.hidden_sizes=(8,16)',
        '--config.gaussian.latent_dim=4')
RUNS = [f'{row}/fold_{fold}' for row in ('gauss1_base', 'gauss1_multi_exact') for fold in (0, 1)]


def grid_command(workdir, *args):
  return [sys.executable, '-m', 'experiments.thesis', '--grid=configs/thesis.py:digits',
          f'--workdir={workdir}', *args]


def run_grid(workdir, *args, timeout=600):
  return subprocess.run(grid_command(workdir, *args), cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=device_env())


def test_paired_test_has_the_t_distributions_interval_and_p_value_on_known_numbers():
  # d = (1, 2, 3): mean 2, standard error 1/sqrt(3), t = 2 sqrt(3) with 2 degrees of freedom,
  # whose CDF is 1/2 + t / (2 sqrt(2 + t^2)); t_0.975(2) = 4.302653.
  result = stats.paired([0.0, 0.0, 0.0], [1.0, 2.0, 3.0], expected_sign=+1)
  t = 2 * math.sqrt(3)
  assert result.mean_difference == 2.0
  np.testing.assert_allclose(result.p_value, 2 * (0.5 - t / (2 * math.sqrt(2 + t * t))), rtol=1e-9)
  np.testing.assert_allclose([result.ci_low, result.ci_high],
                             [2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)], rtol=1e-6)
  assert result.verdict == 'not significant'


def test_paired_test_agrees_with_scipys_one_sample_test_of_the_differences():
  a = np.array([0.031, 0.029, 0.030, 0.033, 0.028])
  b = a - np.array([0.0021, 0.0018, 0.0025, 0.0019, 0.0022])
  result = stats.paired(a, b, expected_sign=-1)
  d = b - a
  half = scipy_stats.t.ppf(0.975, len(d) - 1) * np.std(d, ddof=1) / math.sqrt(len(d))
  np.testing.assert_allclose(result.p_value, scipy_stats.ttest_1samp(d, 0.0).pvalue, rtol=1e-9)
  np.testing.assert_allclose([result.ci_low, result.ci_high], [d.mean() - half, d.mean() + half],
                             rtol=1e-9)
  assert result.verdict == 'holds'
  assert stats.paired(a, b, expected_sign=+1).verdict == 'contradicted'


@pytest.mark.parametrize('a, b, p_value, verdict', [
    ([1.0, 2.0], [2.0, 3.0], 0.0, 'holds'),             # differences without spread
    ([1.0, 2.0], [1.0, 2.0], 1.0, 'not significant'),   # no difference at all
    ([1.0], [2.0], None, 'not significant'),             # one fold: no test
])
def test_paired_test_of_degenerate_folds(a, b, p_value, verdict):
  result = stats.paired(a, b, expected_sign=+1)
  assert (result.p_value, result.verdict) == (p_value, verdict)


@pytest.mark.parametrize('verdicts, combined', [
    (['holds', 'holds'], 'holds'),
    (['holds', 'not significant'], 'not significant'),
    (['holds', 'contradicted', 'not significant'], 'contradicted'),
    ([], 'not significant'),
])
def test_a_claim_holds_when_all_its_comparisons_do_and_is_contradicted_when_any_is(verdicts,
                                                                                   combined):
  assert stats.combined_verdict(verdicts) == combined


def test_digits_grid_is_the_smallest_that_tests_every_claim():
  rows = thesis_grid.get_config('digits').rows.to_dict()
  found = thesis_report.comparisons(rows)
  assert {c.claim for c in found} == set(thesis_report.CLAIMS)
  for name in rows:  # without any one row, some claim goes untested
    rest = {n: f for n, f in rows.items() if n != name}
    assert {c.claim for c in thesis_report.comparisons(rest)} < set(thesis_report.CLAIMS), name


def test_thesis_grid_has_nine_rows_per_model_and_configuration():
  rows = thesis_grid.get_config('fashion_mnist').rows.to_dict()
  assert len(rows) == 45
  for model, presets in thesis_grid.PRESETS.items():
    for preset in presets:
      family = [f for f in rows.values() if (f['model'], f['preset']) == (model, preset)]
      methods = sorted(f['method'] for f in family)
      assert methods == ['multi'] * 4 + ['none'] + ['single'] * 4
      assert {f['exponent'] for f in family if f['method'] == 'single'} == {20, 60}
      assert sum(f['balancing'] == 'softadapt' for f in family) == 2


def test_c6_compares_single_rows_that_differ_only_in_the_exponent():
  rows = thesis_grid.get_config('fashion_mnist').rows.to_dict()
  c6 = [c for c in thesis_report.comparisons(rows) if c.claim == 'C6']
  assert len(c6) == 10  # 5 model configurations x 2 samplings
  for c in c6:
    a, b = rows[c.a], rows[c.b]
    assert {k for k in a if a[k] != b[k]} == {'exponent'} and a['exponent'] < b['exponent']


def test_rows_are_chosen_by_globs_and_an_unknown_one_is_named():
  rows = thesis_grid.get_config('digits').rows.to_dict()
  assert list(thesis.select(rows, 'vq1_single*,gauss1_base')) == [
      'gauss1_base', 'vq1_single_uniform_a20', 'vq1_single_uniform_a60']
  with pytest.raises(mtvae_jax.UserError, match="'vq9_' matches no row"):
    thesis.select(rows, 'gauss1_base,vq9_')


def test_pending_runs_start_fold_by_fold_so_that_later_folds_read_the_compilation_cache(
    tmp_path):
  rows = thesis.select(thesis_grid.get_config('digits').rows.to_dict(), 'gauss1_*')
  _, runs = thesis.expand(rows, 3, tmp_path, 'configs', 'digits')
  (runs[0].workdir / 'metrics.json').parent.mkdir(parents=True)
  (runs[0].workdir / 'metrics.json').write_text('{}')  # gauss1_base fold 0 is done
  assert [(run.row, run.fold) for run in thesis.pending(runs)] == [
      ('gauss1_multi_exact', 0), ('gauss1_single_uniform_a60', 0), ('gauss1_base', 1),
      ('gauss1_multi_exact', 1), ('gauss1_single_uniform_a60', 1), ('gauss1_base', 2),
      ('gauss1_multi_exact', 2), ('gauss1_single_uniform_a60', 2)]


def test_slots_spread_processes_over_the_gpus():
  shared = {'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}
  assert executors.slots(3, ['4', '7']) == [{'CUDA_VISIBLE_DEVICES': '4', **shared},
                                         {'CUDA_VISIBLE_DEVICES': '7', **shared},
                                         {'CUDA_VISIBLE_DEVICES': '4', **shared}]
  assert executors.slots(2, ['4', '7']) == [{'CUDA_VISIBLE_DEVICES': '4'},
                                         {'CUDA_VISIBLE_DEVICES': '7'}]
  assert executors.slots(2, ['0']) == [shared, shared]
  assert executors.slots(2, []) == [{}, {}]


@pytest.fixture(scope='module')
def local_grid(tmp_path_factory):
  """The tiny grid at --parallel=2, killed (SIGKILL) once its first run finished, then rerun.

  Returns (workdir, runs done when it was killed, the rerun's CompletedProcess).
  """
  workdir = tmp_path_factory.mktemp('local') / 'grid'
  first = subprocess.Popen(grid_command(workdir, '--parallel=2', *TINY), cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=device_env())
  deadline = time.monotonic() + 600
  while not list(workdir.glob('*/fold_*/metrics.json')) and time.monotonic() < deadline:
    assert first.poll() is None, 'the grid command ended before any run finished'
    time.sleep(0.2)
  first.send_signal(signal.SIGKILL)
  first.wait()
  done = sorted(str(p.parent.relative_to(workdir)) for p in workdir.glob('*/fold_*/metrics.json'))
  return workdir, done, run_grid(workdir, '--parallel=2', *TINY)


@pytest.fixture(scope='module')
def submitit_grid(tmp_path_factory):
  """The tiny grid's baseline row as a job array of submitit's local executor."""
  workdir = tmp_path_factory.mktemp('submitit') / 'grid'
  args = [a for a in TINY if not a.startswith('--rows')]
  return workdir, run_grid(workdir, '--executor=slurm', '--slurm_cluster=local', '--slurm_gpus=0',
                           '--rows=gauss1_base', *args)


def test_killed_local_grid_finishes_every_fold_when_rerun(local_grid):
  workdir, done_at_kill, rerun = local_grid
  assert rerun.returncode == 0, rerun.stderr
  assert 1 <= len(done_at_kill) < len(RUNS)
  assert all((workdir / run / 'metrics.json').exists() for run in RUNS)
  # A run stopped after its last epoch still writes its metrics, so it may count as done too.
  done_at_rerun = int(re.search(r'(\d+) of 4 runs done', rerun.stdout).group(1))
  assert len(done_at_kill) <= done_at_rerun < len(RUNS)


def test_report_has_every_row_and_the_claims_its_rows_test(local_grid):
  workdir, _, _ = local_grid
  report = json.loads((workdir / 'report.json').read_text())
  assert {name: len(row['folds']) for name, row in report['rows'].items()} == {
      'gauss1_base': 2, 'gauss1_multi_exact': 2}
  verdicts = {c['claim']: c['verdict'] for c in report['claims']}
  assert verdicts['C3'] == verdicts['C6'] == 'not tested'
  assert verdicts['C1'] in stats.VERDICTS and verdicts['C2'] in stats.VERDICTS
  c1 = [r for r in report['comparisons'] if r['claim'] == 'C1']
  assert {(r['metric_a'], r['n']) for r in c1} == {('recon_loss', 2), ('kl_loss', 2)}
  base = json.loads((workdir / 'gauss1_base/fold_1/metrics.json').read_text())
  assert report['rows']['gauss1_base']['folds']['1']['recon_loss'] == base['recon_loss']
  markdown = (workdir / 'report.md').read_text()
  row = '| gauss1_multi_exact | Gaussian VAE | custom | Multi decoder | exact, fixed k |'
  assert row in markdown
  assert (workdir / 'figures' / 'gaussian1_multi.png').stat().st_size > 0


def test_dry_run_lists_the_finished_runs_as_done(local_grid):
  workdir, _, _ = local_grid
  listed = run_grid(workdir, '--dry_run', *TINY)
  assert listed.returncode == 0, listed.stderr
  assert all(f'done     {run.replace("/fold_", " fold ")}' in listed.stdout for run in RUNS)
  assert '4 done, 0 started, 0 pending' in listed.stdout


def test_submitit_job_array_gives_the_table_of_the_killed_and_resumed_local_grid(local_grid,
                                                                                 submitit_grid):
  local_dir, _, _ = local_grid
  workdir, result = submitit_grid
  assert result.returncode == 0, result.stderr
  assert 'submitted 2 runs as jobs' in result.stdout
  ours, theirs = (json.loads((d / 'report.json').read_text())['rows']['gauss1_base']
                  for d in (workdir, local_dir))
  assert ours == theirs
  rerun = run_grid(workdir, '--executor=slurm', '--slurm_cluster=local', '--rows=gauss1_base',
                   *[a for a in TINY if not a.startswith('--rows')])
  assert rerun.returncode == 0 and '2 of 2 runs done, 0 to run' in rerun.stdout


def test_a_bad_flag_ends_in_one_line_with_status_2_before_anything_is_written(tmp_path):
  result = run_grid(tmp_path / 'grid', '--config.train.num_epoch=1')
  assert result.returncode == 2
  assert result.stderr.startswith('error: config key train.num_epoch does not exist')
  assert len(result.stderr.strip().splitlines()) == 1
  assert not (tmp_path / 'grid').exists()


def test_more_folds_than_the_data_has_images_are_refused_before_any_run(tmp_path):
  result = run_grid(tmp_path / 'grid', '--folds=10', '--config.data.max_images=10', '--dry_run')
  assert result.returncode == 2, result.stdout
  assert result.stderr.startswith('error: --folds=10 is not allowed: data set digits leaves ')
  assert len(result.stderr.strip().splitlines()) == 1
  assert not (tmp_path / 'grid').exists()


def test_fewer_than_two_folds_are_refused(tmp_path):
  with pytest.raises(mtvae_jax.UserError, match='--folds=1 is not allowed'):
    thesis.expand({}, 1, tmp_path, 'configs', 'digits')


def fake_fold(workdir, row, fold, **metrics):
  (workdir / row / f'fold_{fold}').mkdir(parents=True)
  (workdir / row / f'fold_{fold}' / 'metrics.json').write_text(json.dumps(metrics))
  record = {'epoch': 1, **{f'val/{k}': v for k, v in metrics.items() if k.endswith('_loss')}}
  (workdir / row / f'fold_{fold}' / 'history.jsonl').write_text(json.dumps(record) + '\n')


def test_unusable_metrics_fail_their_fold_and_other_folders_are_not_folds(tmp_path):
  rows = {name: fields for name, fields in thesis_grid.get_config('digits').rows.items()
          if name in ('gauss1_base', 'gauss1_multi_exact')}
  for fold in (0, 1, 2):
    fake_fold(tmp_path, 'gauss1_base', fold, recon_loss=0.02 + fold, kl_loss=12.0)
    fake_fold(tmp_path, 'gauss1_multi_exact', fold, recon_loss=0.01 + fold, kl_loss=13.0,
              recon_cond_loss=float('nan') if fold == 1 else 0.005)
  (tmp_path / 'gauss1_base' / 'fold_2' / 'metrics.json').write_text('[0.02, 12.0]')
  fake_fold(tmp_path, 'gauss1_base', 'old', recon_loss=5.0, kl_loss=5.0)  # not a fold
  report = thesis_report.write_report(tmp_path, rows, 3, data_name='digits')
  base, multi = report['rows']['gauss1_base'], report['rows']['gauss1_multi_exact']
  assert list(base['folds']) == ['0', '1'] and list(base['failed_folds']) == ['2']
  assert list(multi['folds']) == ['0', '2'] and list(multi['failed_folds']) == ['1']
  assert 'nan' in multi['failed_folds']['1'] and 'not a mapping' in base['failed_folds']['2']
  assert base['mean']['recon_loss'] == pytest.approx(0.52)
  assert all(r['n'] == 1 and r['folds'] == [0] for r in report['comparisons'] if r['claim'] == 'C1')
  assert [line.split(' (')[0] for line in report['failed']] == ['gauss1_base fold 2',
                                                               'gauss1_multi_exact fold 1']
  assert '**Failed folds**' in (tmp_path / 'report.md').read_text()


def test_a_grid_with_unusable_metrics_names_them_in_one_line_with_status_1(tmp_path):
  for row in ('gauss1_base', 'gauss1_multi_exact'):
    for fold in (0, 1):
      fake_fold(tmp_path, row, fold, recon_loss=float('inf') if fold else 0.02, kl_loss=12.0)
  result = run_grid(tmp_path, *TINY)  # every fold has its metrics.json: nothing is trained
  assert result.returncode == 1, result.stderr
  [line] = result.stderr.strip().splitlines()
  assert line.startswith('error: 2 finished runs have unusable metrics')
  assert 'gauss1_base fold 1 (metrics.json holds recon_loss=inf)' in line
  assert '2 of 4 runs done, 0 to run' in result.stdout


def test_report_sets_each_row_beside_the_thesis_in_its_units_and_flags_collapse(tmp_path):
  rows = {name: fields for name, fields in thesis_grid.get_config('fashion_mnist').rows.items()
          if name in ('gauss1_base', 'gauss1_multi_exact_softadapt', 'vq1_single_uniform_a20',
                      'vq2_base')}
  for fold in (0, 1):
    fake_fold(tmp_path, 'gauss1_base', fold, recon_loss=0.02, kl_loss=12.0, active_units=16)
    fake_fold(tmp_path, 'gauss1_multi_exact_softadapt', fold, recon_loss=0.09, recon_cond_loss=0.03,
              kl_loss=0.05, active_units=fold)  # fold 0 collapsed
    fake_fold(tmp_path, 'vq1_single_uniform_a20', fold, recon_loss=0.006, vq_loss=0.003,
              codes_used=40)
    fake_fold(tmp_path, 'vq2_base', fold, recon_loss=0.005, vq_loss=0.002, codes_used=1)
  report = thesis_report.write_report(tmp_path, rows, 2, data_name='fashion_mnist')
  base = report['rows']['gauss1_base']['thesis']
  assert base['thesis'] == [[13.9709, 12.9533]]
  assert base['ours'] == pytest.approx([0.02 * 784, 12.0])  # per-pixel mean -> per-image sum
  assert base['ratio'][0] == pytest.approx([0.02 * 784 / 13.9709, 12.0 / 12.9533])
  single = report['rows']['vq1_single_uniform_a20']['thesis']
  assert single['thesis'] == [[0.0030, 0.0024], [0.0029, 0.0030]]  # exponent not stated
  assert single['ratio'][1] == pytest.approx([0.006 / 0.0029, 0.003 / 0.0030])
  assert report['rows']['vq2_base']['thesis'] is None
  assert report['rows']['gauss1_multi_exact_softadapt']['collapsed_folds'] == ['0']
  assert report['rows']['vq2_base']['collapsed_folds'] == ['0', '1']
  assert report['rows']['gauss1_base']['collapsed_folds'] == []
  markdown = (tmp_path / 'report.md').read_text()
  assert '| gauss1_base | 13.97 | 15.68 | 1.122 | 12.95 | 12 | 0.9264 |' in markdown
  assert "| vq2_base | no counterpart in the thesis's table |" in markdown
  assert '| gauss1_multi_exact_softadapt **collapsed** |' in markdown
  assert 'gauss1_multi_exact_softadapt (folds 0); vq2_base (folds 0, 1)' in markdown


@pytest.mark.parametrize('data', ['mnist', 'fashion_mnist'])
def test_cpu_preset_trains_configuration_1_of_both_models_on_3_folds(tmp_path, data):
  grid = thesis_grid.get_config(f'{data}_cpu')
  rows = grid.rows.to_dict()
  assert len(rows) == 18 and {f['preset'] for f in rows.values()} == {1}
  assert grid.folds == 3
  presets = {name: [*grid.overrides, *grid.model_overrides.get(f['model'], ())]
             for name, f in rows.items()}
  commands, runs = thesis.expand(rows, grid.folds, tmp_path, 'configs', grid.data, (), presets)
  assert len(runs) == 54
  epochs = {name: thesis.resolve(args).train.num_epochs for name, args in commands.items()
            if name in ('gauss1_base', 'vq1_base')}
  assert epochs == {'gauss1_base': 6, 'vq1_base': 3}  # the VQ step costs about twice as much
