"""Work directories that must not be lost or corrupted: the lock, files of another run, damaged
JSON files."""
import collections
import json
import math
import os
import re
import subprocess
import sys
import time
import types

import numpy as np
from PIL import Image
import pytest

from conftest import ROOT
from conftest import device_env
from conftest import run_main
from conftest import small_config
from mtvae_jax import checkpoints
from mtvae_jax import completion
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
from mtvae_jax.completion import calibration as completion_calibration
from mtvae_jax.completion import io as completion_io
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
  (vq_run / 'checkpoints' / 'best' / '1').mkdir(parents=True)  # the run's own checks pass
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


# The completion's commands: experiments.complete, experiments.sparse_benchmark, experiments.prior.

def fake_run(folder, model='gaussian', checkpoint=True):
  """A run folder with config.json and metrics.json, and a best checkpoint file if `checkpoint`."""
  folder.mkdir(parents=True, exist_ok=True)
  (folder / 'config.json').write_text(small_config(model, 'none').to_json_best_effort())
  (folder / 'metrics.json').write_text('{"loss": 1.0}')
  if checkpoint:
    (folder / 'checkpoints' / 'best' / '2').mkdir(parents=True)
    (folder / 'checkpoints' / 'best' / '2' / 'params').write_bytes(b'weights')
  return folder


def listing(folder):
  return sorted(str(path.relative_to(folder)) for path in folder.rglob('*'))


@pytest.fixture
def unloadable(monkeypatch):
  """Makes loading a run fail the test: what is checked must be checked before."""
  monkeypatch.setattr(train, 'load_run', lambda *args: pytest.fail('run loaded before the check'))


def write_png(path, array, mode=None):
  Image.fromarray(np.asarray(array), mode).save(path)


@pytest.mark.parametrize('case', ['npz_onto_itself', 'npz_onto_the_photo', 'npz_onto_the_mask',
                                  'existing_npz', 'existing_panel'])
def test_complete_refuses_an_output_that_is_an_input_or_exists_and_keeps_every_file(
    tmp_path, case, unloadable):
  np.savez(tmp_path / 'a.npz', values=np.full((8, 8, 1), 0.5), mask=np.ones((8, 8)))
  write_png(tmp_path / 'photo.png', np.full((8, 8), 128, np.uint8))
  write_png(tmp_path / 'seen.png', np.full((8, 8), 255, np.uint8))
  (tmp_path / 'old.npz').write_bytes(b'kept')
  (tmp_path / 'old.png').write_bytes(b'kept')
  (tmp_path / 'other.png').write_bytes(b'kept')
  source, mask, output, message = {
      'npz_onto_itself': ('a.npz', None, 'a.npz', "would replace --input '.*a.npz'"),
      'npz_onto_the_photo': ('photo.png', 'seen.png', 'photo.npz',
                             "would replace --input '.*photo.png' with its panel"),
      'npz_onto_the_mask': ('photo.png', 'seen.png', 'seen.npz',
                            "would replace --mask '.*seen.png' with its panel"),
      'existing_npz': ('a.npz', None, 'old.npz', 'old.npz and .*old.png exist'),
      'existing_panel': ('a.npz', None, 'other.npz', 'other.png exist.*give --overwrite'),
  }[case]
  before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
  with pytest.raises(UserError, match=message) as e:
    completion_io.complete_files(fake_run(tmp_path / 'run'), str(tmp_path / source),
                                 mask and str(tmp_path / mask), tmp_path / output)
  assert '\n' not in str(e.value)
  assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == before


def test_complete_replaces_an_existing_output_only_with_overwrite(tmp_path, monkeypatch):
  np.savez(tmp_path / 'a.npz', values=np.full((8, 8, 1), 0.5), mask=np.ones((8, 8)))
  (tmp_path / 'old.npz').write_bytes(b'kept')
  loaded = []
  monkeypatch.setattr(completion, 'load_run', lambda workdir: loaded.append(workdir) or 1 / 0)
  with pytest.raises(ZeroDivisionError):   # past the checks of the files, at loading the run
    completion_io.complete_files('run', str(tmp_path / 'a.npz'), None, tmp_path / 'old.npz',
                                 overwrite=True)
  assert loaded == ['run'] and (tmp_path / 'old.npz').read_bytes() == b'kept'


def test_a_16_bit_grey_png_is_scaled_by_its_bit_depth(tmp_path):
  pixels = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
  write_png(tmp_path / 'deep.png', pixels)
  write_png(tmp_path / 'mask.png', (pixels > 30000).astype(np.uint16))
  values, mask, image = completion_io.read_input(tmp_path / 'deep.png', tmp_path / 'mask.png')
  assert image
  np.testing.assert_allclose(values[..., 0], pixels / 65535, rtol=1e-6)
  np.testing.assert_array_equal(mask, pixels > 30000)
  assert completion_io.fit_channels(values, 3).shape == (8, 8, 3)


@pytest.mark.parametrize('case, message', [
    ('empty', "'.*in.npz' is an empty file: give an .npz of values and mask, or an image"),
    ('text', "'.*in.npz' is not an .npz \\(a zip archive of arrays\\), but named one: save"),
    ('npy', "'.*in.npy' is a .npy file, which holds one array: save values and mask together"),
    ('npy_named_npz', "'.*in.npz' is a .npy file"),
    ('object', "'.*in.npz' cannot be read as an .npz: Object arrays cannot be loaded"),
])
def test_an_input_file_is_named_for_what_it_holds(tmp_path, case, message, unloadable):
  path = tmp_path / ('in.npy' if case == 'npy' else 'in.npz')
  if case == 'empty':
    path.write_bytes(b'')
  elif case == 'text':
    path.write_text('values,mask\n0.5,1\n')
  elif case.startswith('npy'):
    with open(path, 'wb') as f:
      np.save(f, np.zeros((8, 8)))
  else:
    np.savez(path, values=np.array([{'a': 1}], dtype=object), mask=np.ones((8, 8)))
  with pytest.raises(UserError, match=message):
    completion_io.complete_files(tmp_path / 'run', str(path), None, tmp_path / 'out.npz')


@pytest.mark.parametrize('values, mask, message', [
    (np.zeros((0, 8, 8, 1)), np.ones((0, 8, 8)), r'values of shape \(0, 8, 8, 1\) hold no image'),
    (np.array(['a', 'b']), np.ones((8, 8)), 'values of dtype <U1 are not numbers'),
    (np.full((8, 8, 1), 0.5), np.full((8, 8), 'x'), 'mask of dtype <U1 are not numbers')])
def test_inputs_of_no_image_or_of_strings_are_one_line(values, mask, message):
  with pytest.raises(UserError, match=message):
    completion.check_inputs(values, mask, (8, 8, 1))


@pytest.mark.parametrize('num_samples, num_images, message', [
    (10**9, 1, 'use an integer from 2 to 16384 '), (100000, 1, 'use an integer from 2 to 16384 '),
    (1, 1, 'use an integer from 2 to'),
    (10000, 10**6, 'would take 2384.2 GiB, over 1/4 of this machine.* use num_samples <= ')])
def test_num_samples_that_cannot_fit_are_refused_with_the_most_that_fit(num_samples, num_images,
                                                                         message):
  with pytest.raises(UserError, match=f'^num_samples={num_samples} .*{message}'):
    completion.check_num_samples(num_samples, num_images, (8, 8, 1))
  completion.check_num_samples(16384, 1, (8, 8, 1))


def test_a_run_without_checkpoints_is_one_line_and_nothing_is_created(tmp_path):
  run = fake_run(tmp_path / 'run', 'vq', checkpoint=False)
  np.savez(tmp_path / 'in.npz', values=np.full((8, 8, 1), 0.5), mask=np.ones((8, 8)))
  message = "holds the metrics.json of a finished run but no checkpoint"
  with pytest.raises(UserError, match=message):
    completion_io.complete_files(run, str(tmp_path / 'in.npz'), None, tmp_path / 'out.npz')
  with pytest.raises(UserError, match=message):
    prior.train_prior(prior.default_config(), run)
  assert listing(run) == ['config.json', 'metrics.json']
  assert not (tmp_path / 'out.npz').exists()


def test_a_prior_without_checkpoints_is_one_line_and_nothing_is_created(tmp_path, monkeypatch):
  run = fake_run(tmp_path / 'run', 'vq')
  fake_run(run / 'prior', checkpoint=False)
  before = listing(run)
  with pytest.raises(UserError, match="holds the metrics.json of a trained prior but no checkpoint"
                     r".*: remove .*prior and run python -m experiments.prior"):
    prior.load_prior(run, types.SimpleNamespace())
  assert listing(run) == before


def test_a_priors_folder_given_as_the_run_is_named_as_such(tmp_path, unloadable):
  prior_dir = fake_run(tmp_path / 'run', 'vq') / prior.PRIOR_DIR
  prior_dir.mkdir()
  config = prior.default_config()
  (prior_dir / 'config.json').write_text(config.to_json_best_effort())
  (prior_dir / 'metrics.json').write_text('{}')
  message = (f"^workdir '{prior_dir}' is the folder of a PixelCNN prior: give its VQ-VAE run's "
             f"folder, --workdir={prior_dir.parent}$")
  with pytest.raises(UserError, match=message):
    completion.load_run(prior_dir)
  with pytest.raises(UserError, match=message):
    prior.train_prior(config, prior_dir)
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.sparse_benchmark', f'--workdir={prior_dir}'], cwd=ROOT,
      capture_output=True, text=True, timeout=600, env=device_env())
  assert result.returncode == 2
  assert result.stderr.splitlines() == [f"error: workdir '{prior_dir}' is the folder of a PixelCNN "
                                        f"prior: give its VQ-VAE run's folder, --workdir={prior_dir.parent}"]


@pytest.mark.parametrize('flag, value', [('fractions', 'nan'), ('fractions', 'inf'),
                                         ('fractions', '0.1,-inf'), ('counts', '8,x'),
                                         ('num_images', '0')])
def test_sparse_benchmark_flags_are_checked_before_the_run_is_loaded(tmp_path, flag, value):
  result = subprocess.run(  # no run in tmp_path: the flag is what is refused
      [sys.executable, '-m', 'experiments.sparse_benchmark', f'--workdir={tmp_path}',
       f'--{flag}={value}'], cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=device_env())
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
      f'error: --{flag}={value} is not allowed: ' + ('use an integer >= 1' if flag == 'num_images'
                                                     else 'give a comma-separated list of ' + (
                                                         'pixel counts' if flag == 'counts' else
                                                         'fractions of the pixels, each between 0 '
                                                         'and 1'))]


@pytest.mark.parametrize('umask', [0o022, 0o027, 0o002])
def test_json_files_get_the_mode_of_the_umask(tmp_path, umask):
  old = os.umask(umask)
  try:
    workdir.write_json(tmp_path / 'a.json', {'x': 1})
  finally:
    os.umask(old)
  assert (tmp_path / 'a.json').stat().st_mode & 0o777 == 0o666 & ~umask


GOOD_NOISE = {'observed': 0.1, 'hidden': 0.2, 'candidates': completion.CANDIDATES,
              'weighting': [['decoder', 8.0, 0.001]] * len(completion.CALIBRATION_FRACTIONS),
              'predictive': [{'blend': [1.0, 0.0, 0.0, 0.0], 'spread': [1.0, 0.0, 0.0]}]
                            * len(completion.CALIBRATION_FRACTIONS)}
SOURCES = {'run': 'a1', 'prior': None, 'settings': {'pool_size': 3}}


def signed(value):
  """The text of a cache file of `value` as completion.cached writes it, with its sum."""
  return json.dumps(dict(value, sha256=completion.digest(value)))


def noise(**changes):
  return signed({**GOOD_NOISE, 'made_from': SOURCES, **changes})


@pytest.mark.parametrize('text', [
    noise(observed=math.nan), noise(observed=1e308), noise(hidden=math.inf), noise(hidden=-0.5),
    noise(observed='0.1'), noise(observed=[]), noise(observed=True), noise(weighting=[]),
    noise(weighting=[['decoder', -4.0, 0.001]]),
    noise(weighting=[['decoder', 4.0, -1.0]] * 6), noise(weighting=[['decoder', 4.0, 1]] * 6),
    noise(weighting=[['decoder', math.nan, 0.001]] * 6),
    noise(weighting=[['nobody', 4.0, 0.001]] * 6), noise(weighting=[[]] * 6),
    noise(made_from=dict(SOURCES, run='b2')),   # another checkpoint's
    noise(made_from=dict(SOURCES, settings={'pool_size': 4})),
    json.dumps(dict(GOOD_NOISE, made_from=SOURCES)),   # no sum
    noise().replace('0.1', '0.3'),   # a changed digit, still valid JSON: its sum differs
    signed(GOOD_NOISE),   # an older version's, made from what is not recorded
    '[]', '{"observed": 0.1, "hid',
])
def test_a_damaged_mistyped_or_stale_noise_json_is_computed_again(tmp_path, monkeypatch, capsys,
                                                                  text):
  (tmp_path / completion.CACHE_DIR).mkdir()
  path = tmp_path / completion.CACHE_DIR / 'noise.json'
  path.write_text(text)
  fresh = dict(GOOD_NOISE, observed=0.125)
  monkeypatch.setattr(completion_calibration, 'estimate_noise', lambda *args: fresh)
  scales = completion.noise_scales(tmp_path, None, None, None, SOURCES)
  assert scales == dict(fresh, made_from=SOURCES)
  assert json.loads(path.read_text()) == json.loads(signed(scales))
  assert f"'{path}' is " in capsys.readouterr().err
  monkeypatch.setattr(completion_calibration, 'estimate_noise',
                      lambda *args: pytest.fail('not cached'))
  assert completion.noise_scales(tmp_path, None, None, None, SOURCES) == scales


@pytest.mark.parametrize('codes', [
    [[[0, 1], [2, 16]]] * 3, [[[0, 1], [2, -1]]] * 3, [[[0, 1], [2, 3.5]]] * 3,
    [[[0, 1], [2, 'a']]] * 3, [[[0, 1], [2, True]]] * 3, [[[0, 1], [2, 3]]] * 2,
    [[[0, 1, 2]]] * 3, [], [[[0, 1], [2]]] * 3, 'codes'])
def test_prior_codes_out_of_range_of_the_wrong_type_or_grid_are_drawn_again(
    tmp_path, monkeypatch, codes):
  (tmp_path / completion.CACHE_DIR).mkdir()
  path = tmp_path / completion.CACHE_DIR / 'prior_codes.json'
  path.write_text(signed({'codes': codes, 'made_from': SOURCES}))
  drawn = np.arange(12).reshape(3, 2, 2) % 16
  monkeypatch.setattr(prior, 'code_grid', lambda run: (2, 2))
  monkeypatch.setattr(prior, 'sampler', lambda model: lambda params, key, shape: np.resize(
      drawn, shape))
  run = types.SimpleNamespace(config=types.SimpleNamespace(vq=types.SimpleNamespace(
      num_embeddings=16)))
  pool = completion.prior_pool(tmp_path, run, None, None, SOURCES, size=3)
  np.testing.assert_array_equal(pool, drawn)
  assert json.loads(path.read_text()) == json.loads(signed({'codes': drawn.tolist(),
                                                              'made_from': SOURCES}))


def test_the_cache_records_the_checkpoints_it_was_made_from(tmp_path):
  run = fake_run(tmp_path / 'run', 'vq')
  fake_run(run / prior.PRIOR_DIR)
  vq = types.SimpleNamespace(config=types.SimpleNamespace(model='vq'))
  first = completion.made_from(run, vq)
  assert first == json.loads(json.dumps(first))   # as read back from the JSON file
  assert completion.made_from(run, vq) == first
  (run / prior.PRIOR_DIR / 'checkpoints' / 'best' / '2' / 'params').write_bytes(b'retrained')
  second = completion.made_from(run, vq)
  assert second['prior'] != first['prior'] and second['run'] == first['run']
  (run / 'checkpoints' / 'best' / '2').rename(run / 'checkpoints' / 'best' / '3')
  assert completion.made_from(run, vq)['run'] != first['run']
