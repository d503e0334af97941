"""Non-finite losses and work directories that cannot hold a run."""
import json

import jax
import numpy as np
import pytest

from conftest import latest_steps, small
from mtvae_jax import checkpoints
from mtvae_jax import data
from mtvae_jax import train
from mtvae_jax.data import pipeline
from mtvae_jax.errors import UserError

BAD_STEP = 12  # the step of epoch 1 whose batch holds the NaN image (after checkpoints at 5, 10)
NAN_ROW = int(pipeline.epoch_order(0, 1, 1455, 64)[BAD_STEP][0])


def with_nan_image(monkeypatch):
  load = data.load
  def load_with_nan(data_config, seed):
    splits = load(data_config, seed)
    train_images = splits.train.copy()
    train_images[NAN_ROW] = np.nan
    return splits._replace(train=train_images)
  monkeypatch.setattr(data, 'load', load_with_nan)


def test_non_finite_loss_stops_naming_step_and_term_and_keeps_good_checkpoints(
    make_config, tmp_path, monkeypatch):
  with_nan_image(monkeypatch)
  config = small(make_config)
  with pytest.raises(UserError, match=r'non-finite [a-z_]+ at step (\d+): training stopped') as e:
    train.train_and_evaluate(config, tmp_path)
  assert int(str(e.value).split('at step ')[1].split(':')[0]) == BAD_STEP
  assert not (tmp_path / 'metrics.json').exists()
  steps = latest_steps(tmp_path)
  assert steps == [5, 10]  # only states from before the failure
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


def test_skip_mode_with_no_finite_validation_loss_is_one_line_on_every_rerun(
    make_config, tmp_path, monkeypatch):
  load = data.load
  monkeypatch.setattr(data, 'load', lambda data_config, seed: load(data_config, seed)._replace(
      validation=np.full_like(load(data_config, seed).validation, np.nan)))
  config = small(make_config, on_nonfinite='skip', num_epochs=1)
  for _ in range(2):
    with pytest.raises(UserError, match='no epoch had a finite validation loss'):
      train.train_and_evaluate(config, tmp_path)
