"""Property test: a work directory, finished or interrupted inside its last epoch, damaged at
random (a file cut short, a bit flipped, a file deleted), and the same command run again: it ends
in one UserError line, or it resumes and ends with the metrics.json of the undamaged run; never
another exception or a silently different result.

metrics.json of a finished run is the result itself and has no checksum: its bits are left alone.
"""
import json
import pathlib
import shutil
import tempfile

from hypothesis import event, given, settings, strategies as st
import pytest

from conftest import latest_steps
from conftest import small_config
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
    groups = {}  # each part of the directory equally likely, whatever its number of files
    for path in sorted(workdir.rglob('*')):
      if path.is_file() and not (finished and how == 'flip' and path.name == 'metrics.json'):
        groups.setdefault(group(path.relative_to(workdir)), []).append(path)
    name = sorted(groups)[index % len(groups)]
    path = groups[name][index // len(groups) % len(groups[name])]
    event(f'{how} {name}')
    damage(path, how, fraction, bit)
    try:
      result = train.train_and_evaluate(config, workdir)
    except UserError as error:
      assert '\n' not in str(error), str(error)
      event('refused')
      return
    event('same metrics')
    assert result == metrics
    assert json.loads((workdir / 'metrics.json').read_text()) == metrics
