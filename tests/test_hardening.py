"""Work directories that must not be lost or corrupted: the lock, files of another run, damaged
JSON files."""
import collections
import json
import math
import os
import re
import time
import types

import numpy as np
import pytest

from conftest import run_main
from conftest import small_config
from mtvae_jax import checkpoints
from mtvae_jax import config as config_lib
from mtvae_jax.thesis import crossval
from mtvae_jax import data
from mtvae_jax import evaluation
from mtvae_jax import events
from mtvae_jax import generate
from mtvae_jax import loop
from mtvae_jax import prior
from mtvae_jax.thesis import report as thesis_report
from mtvae_jax import train
from mtvae_jax import workdir
from mtvae_jax.errors import UserError


def test_a_run_or_prior_on_a_locked_workdir_is_refused_at_once_naming_the_holder(
    make_config, tmp_path, monkeypatch):
  monkeypatch.setattr(data, 'load', lambda *args: pytest.fail('data loaded for a locked workdir'))
  with workdir.locked(tmp_path):
    with pytest.raises(UserError, match=f'is in use by process {os.getpid()}:'):
      train.train_and_evaluate(make_config('gaussian', 'none'), tmp_path)
  assert not (tmp_path / 'config.json').exists()
  vq_run = tmp_path / 'vq'  # a finished VQ-VAE run, as far as its files say
  vq_run.mkdir()
  (vq_run / 'config.json').write_text(make_config('vq', 'none').to_json_best_effort())
  (vq_run / 'metrics.json').write_text('{}')
  with workdir.locked(vq_run / prior.PRIOR_DIR):
    with pytest.raises(UserError, match=f'is in use by process {os.getpid()}:'):
      prior.train_prior(prior.default_config(), vq_run)


def test_a_stale_lock_of_a_process_gone_is_taken_over(tmp_path):
  (tmp_path / '.lock').write_text('999999999\n')  # no process holds it
  with workdir.locked(tmp_path):
    assert (tmp_path / '.lock').read_text() == f'{os.getpid()}\n'
    with pytest.raises(UserError, match=f'in use by process {os.getpid()}'):
      with workdir.locked(tmp_path):
        pass
  with workdir.locked(tmp_path):  # released at the end of the block
    pass


@pytest.mark.parametrize('left', ['checkpoints', 'history.jsonl', 'metrics.json'])
def test_run_files_without_config_are_refused_and_kept(make_config, tmp_path, left):
  path = tmp_path / left
  if left == 'checkpoints':
    path.mkdir()
    (path / 'other').write_text('x')
  else:
    path.write_text('x')
  with pytest.raises(UserError, match=f'holds {left} but no config.json'):
    train.train_and_evaluate(make_config('gaussian', 'none'), tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['.lock', left]
  assert left != 'checkpoints' or (path / 'other').read_text() == 'x'


def test_a_run_refused_for_disk_space_leaves_no_config(make_config, tmp_path, monkeypatch):
  usage = collections.namedtuple('usage', 'total used free')
  monkeypatch.setattr(workdir.shutil, 'disk_usage', lambda path: usage(10, 10, 0))
  with pytest.raises(UserError, match='0 MiB free'):
    train.train_and_evaluate(make_config('gaussian', 'none'), tmp_path)
  assert not (tmp_path / 'config.json').exists()


def test_json_files_are_replaced_whole(tmp_path, monkeypatch):
  workdir.write_json(tmp_path / 'a.json', {'x': 1})
  workdir.write_json(tmp_path / 'a.json', {'x': 2})
  assert workdir.read_json(tmp_path / 'a.json') == {'x': 2}
  assert [p.name for p in tmp_path.iterdir()] == ['a.json']  # no temporary file left
  def killed(*args):
    raise KeyboardInterrupt
  monkeypatch.setattr(workdir.os, 'replace', killed)  # killed before the new content is in place
  with pytest.raises(KeyboardInterrupt):
    workdir.write_json(tmp_path / 'a.json', {'x': 3})
  assert workdir.read_json(tmp_path / 'a.json') == {'x': 2}


@pytest.mark.parametrize('content', ['', '{"model": "gauss', '\0\0\0', '\xff{'])
@pytest.mark.parametrize('name', ['config.json', 'metrics.json'])
def test_damaged_config_or_metrics_is_one_line_naming_it(make_config, tmp_path, name, content):
  config = make_config('gaussian', 'none')
  (tmp_path / 'config.json').write_text(config.to_json_best_effort())
  (tmp_path / name).write_bytes(content.encode('latin-1'))
  with pytest.raises(UserError, match=f"'{tmp_path / name}' is damaged, not JSON") as e:
    train.train_and_evaluate(config, tmp_path)
  assert '\n' not in str(e.value)


def test_a_torn_last_history_line_is_dropped_and_other_damage_named(tmp_path):
  lines = [json.dumps({'epoch': 1}), json.dumps({'epoch': 2})]
  (tmp_path / 'history.jsonl').write_text('\n'.join(lines) + '\n' + lines[1][:5])
  assert workdir.read_history(tmp_path) == [{'epoch': 1}, {'epoch': 2}]
  with workdir.History(tmp_path, first_epoch=3) as history:
    history.append({'epoch': 3})
  assert workdir.read_history(tmp_path) == [{'epoch': 1}, {'epoch': 2}, {'epoch': 3}]
  (tmp_path / 'history.jsonl').write_text(lines[0][:5] + '\n' + lines[1] + '\n')
  with pytest.raises(UserError, match='history.jsonl\' is damaged at line 1'):
    workdir.read_history(tmp_path)


@pytest.mark.parametrize('content', ['{"config": ', '[]', '{"description": {}}', '3'])
def test_a_damaged_crossval_summary_is_one_line(tmp_path, content):
  (tmp_path / 'crossval.json').write_text(content)
  with pytest.raises(UserError, match="crossval.json' is damaged"):
    crossval.report([tmp_path])


def test_resumed_runs_keep_one_event_file_per_first_epoch(tmp_path):
  def run(first_epoch, last_epoch):
    with events.EventWriter(tmp_path, first_epoch=first_epoch) as writer:
      for epoch in range(first_epoch, last_epoch + 1):
        writer.write({'epoch': epoch, 'train/loss': 1.0}, state=None)
  run(1, 2)
  for _ in range(3):
    run(3, 2)  # stopped before finishing epoch 3: no file
    run(2, 3)  # epoch 2 redone: replaces the files that start at 2 or later
  assert sorted(p.name.rsplit('.', 1)[1] for p in tmp_path.iterdir()) == ['epoch1', 'epoch2']


@pytest.mark.parametrize('key, value', [
    ('gaussian.hidden_sizes', ('abc',)), ('gaussian.hidden_sizes', ('a', 'b')),
    ('gaussian.hidden_sizes', (8.5, 16)), ('gaussian.hidden_sizes', ()), ('seed', -5),
    ('seed', 99999999999999999999), ('loss.softadapt.beta', math.nan),
    ('loss.softadapt.total', math.inf), ('mask.gaussian_std', 1e-30),
    ('loss.weights.kl', math.nan)])
def test_values_of_the_wrong_type_or_range_are_one_line(make_config, key, value):
  config = make_config('gaussian', 'multi')
  with config.unlocked():
    section, _, name = key.rpartition('.')
    setattr(config_lib.lookup(config, section) if section else config, name, value)
  with pytest.raises(UserError, match=rf'^config\.{re.escape(key)}=.* is not allowed: use'):
    config_lib.validate(config)


@pytest.mark.parametrize('arguments, allowed', [
    (dict(temperature=math.inf), 'use a finite number > 0'),
    (dict(seed=99999999999999999999), 'use an integer from 0 to 2\\*\\*32 - 1')])
def test_generate_refuses_an_infinite_temperature_or_a_huge_seed(arguments, allowed):
  run = types.SimpleNamespace(splits=types.SimpleNamespace(test=np.zeros((2, 8, 8, 1))))
  with pytest.raises(UserError, match=f'is not allowed: {allowed}'):
    generate.generate_arrays(run, draw=None, **arguments)


def test_help_and_config_file_mistakes_on_the_command_line(tmp_path):
  shown = run_main('--help')
  assert shown.returncode == 0 and 'train.num_epochs=' in shown.stdout, shown.stderr
  (tmp_path / 'raises.py').write_text('raise RuntimeError("boom")\n')
  (tmp_path / 'none.py').write_text('def get_config():\n  return None\n')
  for args, error in [
      ([f'--config={tmp_path / "raises.py"}'], 'the config file failed to load: RuntimeError: boom'),
      ([f'--config={tmp_path / "none.py"}'], 'made a NoneType, not a ConfigDict'),
      (['--config=configs/gauss_multi.py', '--config.train.num_epoch=3'],
       'config key config.train.num_epoch does not exist: Did you mean "num_epochs"')]:
    result = run_main(*args)
    last = result.stderr.splitlines()[-1]
    assert result.returncode == 2 and last.startswith('error: ') and error in last, result.stderr


def test_metrics_lines_put_the_losses_first_and_a_finished_run_shows_its_metrics(
    make_config, tmp_path, capsys):
  assert loop.format_metrics({'a': 1.0, 'recon_loss': 0.123456, 'loss': 2.0, 'kl_loss': 3.0}) == (
      'loss=2 kl_loss=3 recon_loss=0.1235 a=1')
  config = make_config('gaussian', 'none')
  (tmp_path / 'config.json').write_text(config.to_json_best_effort())
  (tmp_path / 'metrics.json').write_text('{"recon_loss": 0.25, "loss": 0.5, "best_epoch": 2}')
  train.train_and_evaluate(config, tmp_path)
  assert 'metrics.json is kept: loss=0.5 recon_loss=0.25 best_epoch=2' in capsys.readouterr().out


@pytest.mark.parametrize('manifest', [None, '', '[]', '{"state/x": "0"}'])
def test_a_best_checkpoint_with_a_bad_manifest_is_damaged_and_one_without_is_restored(
    tmp_path, manifest):
  best, _ = checkpoints.managers(tmp_path, 1)
  state = types.SimpleNamespace(params={'w': np.ones(3, np.float32)}, batch_stats={})
  state.replace = lambda **changes: types.SimpleNamespace(**changes)
  checkpoints.save_best(best, 1, state)
  assert checkpoints.restore_best(best, state, 1).params['w'].tolist() == [1, 1, 1]
  path = tmp_path / 'checkpoints' / 'best' / '1' / checkpoints.MANIFEST
  if manifest is None:  # an older version's checkpoint, or a kill before the sums were written
    path.unlink()
    assert checkpoints.restore_best(best, state, 1).params['w'].tolist() == [1, 1, 1]
    return
  path.write_text(manifest)
  with pytest.raises(UserError, match=r'best checkpoint .*/1 is damaged \((no readable|'
                     r'sha256.json holds no|SHA-256 of)'):
    checkpoints.restore_best(best, state, 1)


def test_latest_checkpoints_are_summed_when_the_next_save_starts_and_read_unsummed(tmp_path):
  _, latest = checkpoints.managers(tmp_path, 3)
  folder = lambda step: tmp_path / 'checkpoints' / 'latest' / str(step) / checkpoints.MANIFEST
  for step in (1, 2):
    checkpoints.save_latest(latest, step, {'w': np.full(3, step, np.float32)}, {'step': step})
  assert folder(1).exists() and not folder(2).exists()  # the second save finished the first
  checkpoints.finish(latest)
  assert folder(2).exists()
  folder(2).unlink()  # as if killed before its sums: whole by orbax's rename, so it is read
  tree, loop = checkpoints.restore_latest(latest, {'w': np.zeros(3, np.float32)})
  assert tree['w'].tolist() == [2, 2, 2] and loop['step'] == 2


def test_the_thesis_report_reads_fold_files_as_the_runs_do(tmp_path):
  (tmp_path / 'fold_0').mkdir()
  (tmp_path / 'fold_0' / 'history.jsonl').write_text('{"epoch": 1}\n{"epo')
  assert thesis_report.fold_histories(tmp_path, [0]) == {0: [{'epoch': 1}]}
  (tmp_path / 'fold_0' / 'metrics.json').write_text('')
  with pytest.raises(UserError, match="metrics.json' is damaged"):
    thesis_report.fold_metrics(tmp_path)


COMPILE_SECONDS = 1000.0  # what the first train step of idx_run takes on the loop's clock


@pytest.fixture(scope='module')
def idx_run(tmp_path_factory):
  """(config, workdir) of a finished 1-epoch run on 12x12 IDX images with mask.num_pixels=-1,
  whose compiling train step took COMPILE_SECONDS more on the training loop's clock."""
  from test_data import write_idx
  folder, run_dir = tmp_path_factory.mktemp('idx'), tmp_path_factory.mktemp('idx_run')
  rng = np.random.default_rng(0)
  write_idx(folder / 'train-images-idx3-ubyte.gz', rng.integers(0, 256, (120, 12, 12)))
  write_idx(folder / 't10k-images-idx3-ubyte.gz', rng.integers(0, 256, (20, 12, 12)))
  config = small_config('gaussian', 'multi', num_epochs=1)
  config.mask.num_pixels = config_lib.GRID_NUM_PIXELS
  config.data.update(name='idx', path=str(folder))
  config.train.batch_size = 32  # 108 training images: 3 steps
  offset = [0.0]
  guarded_step = loop.guarded_step

  def slow_to_compile(*args, **kwargs):  # runs once per compilation, while jit traces
    offset[0] += COMPILE_SECONDS
    return guarded_step(*args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(loop, 'guarded_step', slow_to_compile)
    patch.setattr(loop, 'time', types.SimpleNamespace(
        perf_counter=lambda: time.perf_counter() + offset[0]))
    train.train_and_evaluate(config, run_dir)
  return config, run_dir


def test_the_default_mask_count_is_a_grid_of_the_images_loaded_and_recorded(idx_run, capsys):
  config, run_dir = idx_run
  assert workdir.read_json(run_dir / 'config.json')['mask']['num_pixels'] == 36  # 12x12 / 2x2
  metrics = workdir.read_json(run_dir / 'metrics.json')
  assert train.train_and_evaluate(config, run_dir) == metrics  # the same config: kept
  assert 'its metrics.json is kept' in capsys.readouterr().out
  (run_dir / 'metrics.json').unlink()  # unfinished: the same config resumes
  assert train.train_and_evaluate(config, run_dir) == metrics
  explicit = config.copy_and_resolve_references()
  explicit.mask.num_pixels = 10
  with pytest.raises(UserError, match='differs at mask.num_pixels'):
    train.train_and_evaluate(explicit, run_dir)


@pytest.mark.parametrize('side, count', [(8, 16), (12, 36), (28, 49), (32, 64), (64, 256)])
def test_a_grid_count_follows_the_image_size_and_an_explicit_count_is_kept(side, count):
  config = config_lib.base_config('vq', 'multi', 'digits')
  assert config.mask.num_pixels == config_lib.GRID_NUM_PIXELS
  resolved = config_lib.resolve_for_images(config, (side, side, 1))
  assert resolved.mask.num_pixels == count and config.mask.num_pixels == -1
  config.mask.num_pixels = 10
  assert config_lib.resolve_for_images(config, (side, side, 1)).mask.num_pixels == 10


def test_the_compiling_step_is_left_out_of_images_per_s(idx_run):
  (record,) = workdir.read_history(idx_run[1])
  assert record['seconds'] > COMPILE_SECONDS  # the epoch's time includes the compilation
  # 96 images in over COMPILE_SECONDS would be under 0.1 images/s
  assert record['images_per_s'] > 1.0


def test_evaluate_refuses_a_baseline_of_another_test_split_before_loading_the_run(
    make_config, tmp_path, monkeypatch):
  monkeypatch.setattr(train, 'load_run', lambda *args: pytest.fail('run loaded before the check'))
  for name, seed in (('run', 0), ('baseline', 1)):
    config = make_config('gaussian', 'multi')
    config.seed = seed
    (tmp_path / name).mkdir()
    (tmp_path / name / 'config.json').write_text(config.to_json_best_effort())
    (tmp_path / name / 'metrics.json').write_text('{"recon_loss": 0.1}')
    (tmp_path / name / 'history.jsonl').write_text('{"epoch": 1}\n')
  with pytest.raises(UserError, match='^--baseline=.* differs from the run at seed: use') as e:
    evaluation.evaluate_run(tmp_path / 'run', tmp_path / 'baseline')
  assert '\n' not in str(e.value)


def test_results_print_as_one_line_of_4_significant_digits():
  curve = {'num_pixels': [0, 1], 'errors': {'exact': [0.123456789012, 0.0123456789]},
           'unconditioned': 0.98765432101, 'baseline': None}
  assert loop.format_metrics(config_lib.flatten(curve)) == (
      'baseline=None errors.exact=[0.1235, 0.01235] num_pixels=[0, 1] unconditioned=0.9877')
