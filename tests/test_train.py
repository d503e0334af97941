import json

import jax
import numpy as np
import pytest

from conftest import ROOT
from conftest import VARIANTS
from mtvae_jax import data
from mtvae_jax import loop
from mtvae_jax import models
from mtvae_jax import train
from mtvae_jax import workdir
from mtvae_jax.errors import UserError
from mtvae_jax.thesis import runs


# conftest.small_config's narrow layers, as flags of a config file
SMALL = ['--config.gaussian.hidden_sizes=(8,16)', '--config.gaussian.latent_dim=4',
         '--config.vq.hidden_sizes=(8,16)', '--config.vq.num_residual_layers=1',
         '--config.vq.num_embeddings=16', '--config.vq.embedding_dim=4',
         '--config.train.batch_size=64', '--config.train.num_epochs=2']


@pytest.mark.parametrize('model_name,method', VARIANTS)
def test_each_config_file_trains_and_lowers_its_loss(model_name, method, tmp_path):
  """configs/<model>_<method>.py with experiments.main's flag handling, trained for 2 epochs."""
  name = f'{runs.CONFIG_FILES[model_name]}_{runs.METHOD_FILES[method]}'
  config = runs.resolve([f'--config={ROOT}/configs/{name}.py', *SMALL])
  assert (config.model, config.method) == (model_name, method)
  metrics = train.train_and_evaluate(config, tmp_path)
  history = [json.loads(line) for line in (tmp_path / 'history.jsonl').read_text().splitlines()]
  assert [h['epoch'] for h in history] == [1, 2]
  assert history[1]['train/loss'] < 0.9 * history[0]['train/loss']
  regularizer = f'{models.REGULARIZER[model_name]}_loss'
  trained = {key.split('/')[1] for key in history[0] if key.startswith('train/')}
  assert trained == {'loss', 'recon_loss', regularizer} | ({'recon_cond_loss'} if method == 'multi'
                                                            else set())
  for key in ('loss', 'recon_loss', regularizer, 'best_epoch'):
    assert np.isfinite(metrics[key])
  assert ('recon_cond_loss' in metrics) == (method != 'none')


def test_train_and_evaluate_writes_outputs_and_keeps_best_epoch(make_config, tmp_path):
  config = make_config('vq', 'multi', num_epochs=3)
  result = train.train_and_evaluate(config, tmp_path)
  history = [json.loads(line) for line in (tmp_path / 'history.jsonl').read_text().splitlines()]
  assert [h['epoch'] for h in history] == [1, 2, 3]
  for key in ('train/loss', 'val/loss', 'val/recon_loss', 'val/recon_cond_loss', 'val/vq_loss',
              'seconds', 'images_per_s'):
    assert all(np.isfinite(h[key]) for h in history), key
  val = [h['val/loss'] for h in history]
  assert result['best_epoch'] == 1 + int(np.argmin(val))
  assert result['best_val_loss'] == pytest.approx(min(val))
  saved = json.loads((tmp_path / 'metrics.json').read_text())
  assert saved == pytest.approx(result)
  for key in ('loss', 'recon_loss', 'recon_cond_loss', 'vq_loss', 'best_epoch'):
    assert key in saved
  # the diagnostics of the codebook and of the conditioned decoder's use of z
  num_codes = config.vq.num_embeddings
  assert 1 <= saved['codebook_perplexity'] <= num_codes
  assert saved['codes_used'] in range(1, num_codes + 1)
  assert saved['codebook_perplexity'] <= saved['codes_used']
  assert np.isfinite(saved['z_use'])
  for key in ('codebook_perplexity', 'codes_used', 'z_use'):
    assert all(np.isfinite(h[f'val/{key}']) for h in history), key
  assert not {'code_counts', 'z_use_errors', 'active_units'} & set(saved)
  assert json.loads((tmp_path / 'config.json').read_text())['method'] == 'multi'
  assert (tmp_path / 'checkpoints' / 'best' / str(result['best_epoch'])).is_dir()


def test_test_metrics_come_from_the_best_checkpoint(make_config, tmp_path):
  config = make_config('gaussian', 'none', num_epochs=3)
  config.train.learning_rate = 0.05  # large enough that later epochs can be worse
  result = train.train_and_evaluate(config, tmp_path)
  run = train.load_run(tmp_path)  # restores the best checkpoint
  eval_fn = jax.jit(lambda s, x, w, k: train.eval_step(s, x, w, k, config=config))
  evaluate = lambda split: loop.evaluate(eval_fn, run.state, split, config.train.batch_size,
                                         run.eval_key, finish=train.diagnostic_metrics)
  val = evaluate(run.splits.validation)
  assert val['loss'] == pytest.approx(result['best_val_loss'], rel=1e-5)
  test = evaluate(run.splits.test)
  assert test == pytest.approx({key: result[key] for key in test}, rel=1e-5)
  # the number of active latent units, of the Gaussian VAE without conditioned decoder
  assert result['active_units'] in range(config.gaussian.latent_dim + 1)
  history = (tmp_path / 'history.jsonl').read_text().splitlines()
  assert all('val/active_units' in json.loads(line) for line in history)
  assert not {'latent_sums', 'z_use', 'codes_used'} & set(result)


def test_load_run_refuses_an_unfinished_workdir(tmp_path):
  with pytest.raises(UserError, match='holds no finished run'):
    train.load_run(tmp_path)


def test_same_config_and_seed_give_the_same_metrics(make_config, tmp_path):
  config = make_config('gaussian', 'single', num_epochs=1)
  first = train.train_and_evaluate(config, tmp_path / 'a')
  assert train.train_and_evaluate(config, tmp_path / 'b') == first


def test_workdir_of_another_config_is_refused_and_kept(make_config, tmp_path):
  config = make_config('vq', 'none', num_epochs=1)
  train.train_and_evaluate(config, tmp_path)
  before = (tmp_path / 'metrics.json').read_text()
  other = make_config('vq', 'none', num_epochs=2)
  with pytest.raises(UserError, match='another config.*train.num_epochs'):
    train.train_and_evaluate(other, tmp_path)
  assert (tmp_path / 'metrics.json').read_text() == before
  # the same config again returns the finished run's metrics without retraining, also when
  # only keys of where and how it runs differ
  assert train.train_and_evaluate(config, tmp_path) == json.loads(before)
  config.distributed.process_id = 0
  config.data.update(cache_dir='none', num_workers=0)
  assert train.train_and_evaluate(config, tmp_path) == json.loads(before)


def test_folds_are_disjoint_cover_the_pool_and_keep_the_test_split(make_config):
  config = make_config('gaussian', 'none')
  base = data.load(config.data, config.seed)
  pool = np.concatenate([base.train, base.validation])
  config.data.num_folds = 5
  held_out = []
  for index in range(5):
    config.data.fold = index
    splits = data.load(config.data, config.seed)
    np.testing.assert_array_equal(splits.test, base.test)
    assert len(splits.train) + len(splits.validation) == len(pool)
    held_out.append(splits.validation)
    again = data.load(config.data, config.seed)
    np.testing.assert_array_equal(again.validation, splits.validation)
  # together the held-out folds are the pool, each image once
  flat = np.concatenate(held_out).reshape(len(pool), -1)
  np.testing.assert_array_equal(np.sort(flat, axis=0), np.sort(pool.reshape(len(pool), -1), axis=0))


@pytest.mark.parametrize('num_folds,fold,message', [(1, 0, 'data.num_folds=1'), (5, 5, 'data.fold=5')])
def test_bad_fold_settings_are_refused(make_config, num_folds, fold, message):
  config = make_config('gaussian', 'none')
  config.data.num_folds, config.data.fold = num_folds, fold
  with pytest.raises(UserError, match=message):
    data.load(config.data, config.seed)


def test_a_run_written_before_a_config_key_existed_loads_with_its_default(make_config, tmp_path):
  config = make_config('gaussian', 'single')
  config.train.batch_size = 32
  stored = json.loads(config.to_json_best_effort())
  del stored['distributed']
  (tmp_path / 'config.json').write_text(json.dumps(stored))
  (tmp_path / 'metrics.json').write_text('{}')
  loaded = workdir.load_config(tmp_path)
  assert loaded.train.batch_size == 32 and loaded.method == 'single'
  assert loaded.distributed == config.distributed
