"""Checkpoints in a run's work directory, written with orbax (no pickle).

  checkpoints/best/<epoch>    params and batch-norm statistics of the best epoch by validation loss
  checkpoints/latest/<step>   the whole train state and the loop's position, for resuming

orbax writes each checkpoint into a temporary folder and renames it when it is
complete, so a run killed mid-write leaves no half checkpoint under a step
name. A checkpoint that is still unreadable (damaged on disk) is skipped with
a one-line warning in favour of the one before it.
"""
import pathlib
import sys

import jax
import orbax.checkpoint as ocp

from mtvae_jax.errors import UserError

FORMAT = 1  # bumped when the saved layout changes; older checkpoints are refused


def managers(workdir, keep_latest):
  """(best, latest) checkpoint managers under workdir/checkpoints."""
  root = pathlib.Path(workdir).absolute() / 'checkpoints'
  best = ocp.CheckpointManager(root / 'best', options=ocp.CheckpointManagerOptions(max_to_keep=1))
  latest = ocp.CheckpointManager(root / 'latest',
                                 options=ocp.CheckpointManagerOptions(max_to_keep=keep_latest))
  return best, latest


def _save(manager, step, args):
  if step in manager.all_steps():  # written before a crash, now redone
    manager.delete(step)
  manager.save(step, args=args, force=True)


def save_best(manager, epoch, state):
  """Saves params and batch-norm statistics as the best epoch."""
  _save(manager, epoch, ocp.args.StandardSave(
      {'params': state.params, 'batch_stats': state.batch_stats}))


def restore_best(manager, state, epoch=None):
  """`state` with params and batch-norm statistics of the best checkpoint."""
  restored = manager.restore(epoch or manager.latest_step(), args=ocp.args.StandardRestore(
      {'params': state.params, 'batch_stats': state.batch_stats}))
  return state.replace(params=restored['params'], batch_stats=restored['batch_stats'])


def _without_empty(tree):
  """orbax cannot write zero-size arrays: they are left out, and refilled from the template."""
  return jax.tree.map(lambda x: x if x.size else None, tree)


def save_latest(manager, step, tree, loop):
  """Saves a pytree of arrays (train state, metric sums) and the loop's JSON position."""
  _save(manager, step, ocp.args.Composite(
      state=ocp.args.StandardSave(_without_empty(tree)), loop=ocp.args.JsonSave(dict(loop, format=FORMAT))))


def restore_latest(manager, template):
  """(tree, loop) from the newest readable latest checkpoint, or None when there is none.

  `template` is a pytree of the saved structure (its values are not used).
  """
  errors = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
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
      errors.append(f'{step}: {type(e).__name__}')
      print(f'warning: checkpoint {manager.directory}/{step} is unreadable '
            f'({type(e).__name__}); trying the one before it', file=sys.stderr)
      continue
    return tree, loop
  if errors:
    raise UserError(f'no readable checkpoint in {manager.directory} ({", ".join(errors)}): '
                    'remove that folder to start over, or use another --workdir')
  return None
