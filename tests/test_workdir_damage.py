"""Property tests: a work directory, finished or interrupted inside its last epoch, damaged at
random (a file cut short, a bit flipped, a file deleted), and the same command run again: it ends
in one UserError line, or it resumes and ends with the metrics.json of the undamaged run; never
another exception or a silently different result. The same for the completion's files of a VQ-VAE
run (its prior/ and its completion/ cache): the completion is refused in one line or completes
with the calibration and the prior's samples of the undamaged run.

metrics.json of a finished run is the result itself and has no checksum: its bits are left alone.
"""
import json
import pathlib
import shutil
import tempfile

from hypothesis import event, given, settings, strategies as st
import numpy as np
import pytest

from conftest import latest_steps
from conftest import quick_calibration
from conftest import small_config
from mtvae_jax import completion
from mtvae_jax import prior
from mtvae_jax import train
from mtvae_jax.errors import UserError

DAMAGES = ('truncate', 'flip', 'delete')


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """(config, workdir, metrics) of a small finished 2-epoch run with several latest checkpoints."""
  config = small_config('gaussian', 'none')
  config.train.checkpoint_every_steps = 10
  workdir = tmp_path_factory.mktemp('finished')
  return config, workdir, train.train_and_evaluate(config, workdir)


def group(relative):
  """The part of a work directory that a file (path relative to it) belongs to."""
  parts = relative.parts
  if parts[0] == 'checkpoints':
    return '/'.join(parts[:2])
  return 'events' if parts[0].startswith('events.') else parts[0]


def damage(path, how, fraction, bit):
  """Cuts `path` to `fraction` of its bytes, flips bit `bit` of the byte at `fraction`, or deletes
  it."""
  raw = bytearray(path.read_bytes())
  position = min(int(fraction * len(raw)), max(len(raw) - 1, 0))
  if how == 'delete':
    path.unlink()
  elif how == 'truncate':
    path.write_bytes(raw[:position])
  elif raw:
    raw[position] ^= 1 << bit
    path.write_bytes(raw)


def damage_one(workdir, paths, group, index, how, fraction, bit, skip):
  """Damages one of the files among `paths` (but those `skip` names), chosen by `index` so that
  each group of files is equally likely, whatever its number of files."""
  groups = {}
  for path in paths:
    if path.is_file() and not skip(path):
      groups.setdefault(group(path.relative_to(workdir)), []).append(path)
  name = sorted(groups)[index % len(groups)]
  path = groups[name][index // len(groups) % len(groups[name])]
  event(f'{how} {name}')
  damage(path, how, fraction, bit)


@settings(max_examples=16, deadline=None, derandomize=True)
@given(finished=st.booleans(), index=st.integers(0, 10**6), how=st.sampled_from(DAMAGES),
       fraction=st.floats(0, 1), bit=st.integers(0, 7))
def test_a_damaged_workdir_is_refused_in_one_line_or_resumed_to_the_same_metrics(
    finished_run, finished, index, how, fraction, bit):
  config, original, metrics = finished_run
  with tempfile.TemporaryDirectory() as folder:
    workdir = pathlib.Path(folder) / 'run'
    shutil.copytree(original, workdir)
    if not finished:  # as if killed before its last checkpoint: it resumes inside epoch 2
      (workdir / 'metrics.json').unlink()
      shutil.rmtree(workdir / 'checkpoints' / 'latest' / str(max(latest_steps(workdir))))
    damage_one(workdir, sorted(workdir.rglob('*')), group, index, how, fraction, bit,
               skip=lambda path: finished and how == 'flip' and path.name == 'metrics.json')
    try:
      result = train.train_and_evaluate(config, workdir)
    except UserError as error:
      assert '\n' not in str(error), str(error)
      event('refused')
      return
    event('same metrics')
    assert result == metrics
    assert json.loads((workdir / 'metrics.json').read_text()) == metrics


@pytest.fixture(scope='module')
def completed_run(tmp_path_factory):
  """(workdir, noise, pool) of a small finished VQ-VAE run with a tiny prior and its completion
  cache (quick_calibration)."""
  workdir = tmp_path_factory.mktemp('vq')
  train.train_and_evaluate(small_config('vq', 'none'), workdir)
  config = prior.default_config()
  config.pixelcnn.update(features=8, num_layers=2)
  config.train.update(num_epochs=1, batch_size=64)
  prior.train_prior(config, workdir)
  with quick_calibration():
    helper = completion.completer(workdir)
  return workdir, helper.noise, np.asarray(helper.family.data['pool'])


def completion_group(relative):
  """The part of the completion's files that a file (path relative to the run) belongs to."""
  parts = relative.parts
  return '/'.join(parts[:3] if parts[:2] == ('prior', 'checkpoints') else parts[:2])


@settings(max_examples=16, deadline=None, derandomize=True)
@given(index=st.integers(0, 10**6), how=st.sampled_from(DAMAGES), fraction=st.floats(0, 1),
       bit=st.integers(0, 7))
def test_damaged_completion_files_are_refused_in_one_line_or_computed_again_the_same(
    completed_run, index, how, fraction, bit):
  original, noise, pool = completed_run
  with tempfile.TemporaryDirectory() as folder:
    workdir = pathlib.Path(folder) / 'run'
    shutil.copytree(original, workdir)
    paths = sorted([*(workdir / completion.CACHE_DIR).rglob('*'),
                    *(workdir / prior.PRIOR_DIR).rglob('*')])
    damage_one(workdir, paths, completion_group, index, how, fraction, bit,
               skip=lambda path: path.name == '.lock' or (
                   how == 'flip' and path.name == 'metrics.json'))
    try:
      with quick_calibration():
        helper = completion.completer(workdir)
    except UserError as error:
      assert '\n' not in str(error), str(error)
      event('refused')
      return
    event('the same completion')
    assert helper.noise == noise
    np.testing.assert_array_equal(helper.family.data['pool'], pool)
