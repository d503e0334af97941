"""Checkpoints in a run's work directory, written with orbax (no pickle).

  checkpoints/best/<epoch>    params and batch-norm statistics of the best epoch by validation loss
  checkpoints/latest/<step>   the whole train state and the loop's position, for resuming

orbax writes each checkpoint in the background into a temporary folder and
renames it when it is complete, so a run killed mid-write leaves no half
checkpoint under a step name. Training goes on meanwhile: the next save of the
same manager, or `finish`, waits for it and then writes the SHA-256 of each of
its files into its sha256.json (atomically). Restoring checks those first: a
checkpoint whose files differ from their sums counts as damaged; one without
sha256.json (a run killed before the sums, or written by an older version) is
whole by orbax's rename and is read unchecked. A damaged latest checkpoint is
skipped with a one-line warning in favour of the one before it; a damaged best
checkpoint is a UserError.
"""
import hashlib
import pathlib
import sys
import weakref

import jax

from mtvae_jax import models
from mtvae_jax import parallel
from mtvae_jax import workdir as workdir_lib
from mtvae_jax.errors import UserError

FORMAT = 1  # bumped when the saved layout changes; older checkpoints are refused
MANIFEST = 'sha256.json'
METADATA_BYTES = 2**18  # what orbax writes beside the arrays of a checkpoint (about 100 KiB)


# manager -> the step it is writing in the background, whose sums are still to be written
_UNSUMMED = weakref.WeakKeyDictionary()


class Damaged(Exception):
  """A checkpoint whose files do not match its sha256.json."""


def _sums(folder):
  """{path relative to `folder`: SHA-256 hex digest} of the files under `folder` but MANIFEST."""
  sums = {}
  for path in sorted(folder.rglob('*')):
    if path.is_file() and path.name != MANIFEST:
      digest = hashlib.sha256()
      with open(path, 'rb') as f:
        for block in iter(lambda: f.read(2**20), b''):  # hashlib.file_digest needs Python 3.11
          digest.update(block)
      sums[str(path.relative_to(folder))] = digest.hexdigest()
  return sums


def _step_folder(manager, step):
  return pathlib.Path(manager.directory) / str(step)


def verify(manager, step):
  """Raises Damaged unless the files of checkpoint `step` match its sha256.json, if it has one."""
  folder = _step_folder(manager, step)
  if not (folder / MANIFEST).exists():
    return
  try:
    expected = workdir_lib.read_json(folder / MANIFEST)
  except (OSError, UserError):
    raise Damaged(f'no readable {MANIFEST}') from None
  if not isinstance(expected, dict):
    raise Damaged(f'{MANIFEST} holds no table of sums')
  actual = _sums(folder)
  if actual != expected:
    differ = sorted(name for name in expected.keys() | actual.keys()
                    if expected.get(name) != actual.get(name))
    raise Damaged(f'SHA-256 of {", ".join(differ[:3])} differs from {MANIFEST}')


def managers(workdir, keep_latest):
  """(best, latest) checkpoint managers under workdir/checkpoints."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  # slow to import: when a run starts
  root = pathlib.Path(workdir).absolute() / 'checkpoints'
  best = ocp.CheckpointManager(root / 'best', options=ocp.CheckpointManagerOptions(max_to_keep=1))
  latest = ocp.CheckpointManager(root / 'latest',
                                 options=ocp.CheckpointManagerOptions(max_to_keep=keep_latest))
  return best, latest


def finish(manager):
  """Waits for `manager`'s background save, then writes that checkpoint's sums."""
  manager.wait_until_finished()
  step = _UNSUMMED.pop(manager, None)
  if step is not None and parallel.is_writer():  # one process sums the shared folder
    workdir_lib.write_json(_step_folder(manager, step) / MANIFEST,
                           _sums(_step_folder(manager, step)))


def _save(manager, step, args):
  """Starts writing checkpoint `step` in the background, once the previous one is finished."""
  finish(manager)
  if step in manager.all_steps():  # written before a crash, now redone
    manager.delete(step)
  manager.save(step, args=args, force=True)
  _UNSUMMED[manager] = step


def save_best(manager, epoch, state):
  """Saves params and batch-norm statistics as the best epoch."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  _save(manager, epoch, ocp.args.StandardSave(models.variables(state)))


def restore_best(manager, state, epoch=None):
  """`state` with params and batch-norm statistics of the best checkpoint; UserError when its
  files fail their checksums."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  finish(manager)
  epoch = epoch or manager.latest_step()
  try:
    verify(manager, epoch)  # the only best checkpoint: nothing to fall back to
  except Damaged as e:
    raise UserError(f'the best checkpoint {manager.directory}/{epoch} is damaged ({e}): remove '
                    f'{manager.directory} and its run\'s metrics.json, then train again') from None
  restored = manager.restore(epoch, args=ocp.args.StandardRestore(models.variables(state)))
  return state.replace(params=restored['params'], batch_stats=restored['batch_stats'])


def _without_empty(tree):
  """orbax cannot write zero-size arrays: they are left out, and refilled from the template."""
  return jax.tree.map(lambda x: x if x.size else None, tree)


def save_latest(manager, step, tree, loop):
  """Saves a pytree of arrays (train state, metric sums) and the loop's JSON position."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  _save(manager, step, ocp.args.Composite(
      state=ocp.args.StandardSave(_without_empty(tree)), loop=ocp.args.JsonSave(dict(loop, format=FORMAT))))


def restore_latest(manager, template):
  """(tree, loop) from the newest readable latest checkpoint, or None when there is none.

  `template` is a pytree of the saved structure (its values are not used).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  errors = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      verify(manager, step)
      loop = manager.restore(step, args=ocp.args.Composite(loop=ocp.args.JsonRestore())).loop
      if loop.get('format') != FORMAT:
        raise UserError(f'checkpoint {manager.directory}/{step} has format {loop.get("format")}, '
                        f'this version reads format {FORMAT}: use another --workdir')
      tree = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_without_empty(template)))).state
      tree = jax.tree.map(lambda empty, value: empty if value is None else value, template, tree,
                          is_leaf=lambda x: x is None)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # any damage: fall back to an older one
      reason = str(e) if isinstance(e, Damaged) else type(e).__name__
      errors.append(f'{step}: {reason}')
      print(f'warning: checkpoint {manager.directory}/{step} is unreadable ({reason}); trying '
            'the one before it', file=sys.stderr)
      continue
    return tree, loop
  if errors:
    raise UserError(f'no readable checkpoint in {manager.directory} ({", ".join(errors)}): '
                    'remove that folder to start over, or use another --workdir')
  return None
