"""The completion/ cache of a run: JSON files that carry their own sum and what they were made
from, computed again when damaged or stale.
"""
import hashlib
import json
import pathlib
import sys

from mtvae_jax import workdir as workdir_lib
from mtvae_jax.errors import UserError


def digest(value):
  """SHA-256 (hex) of the JSON object `value`, its keys sorted: a cache file's own sum."""
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def cached(path, compute, valid, sources):
  """The JSON object in `path` where it matches its 'sha256' (digest), was made from `sources`
  and valid(it); else compute() with 'made_from': sources, written there with its sum (unless
  the folder is read-only). A file that is there but stale or damaged is named on stderr as it
  is replaced."""
  try:
    value = workdir_lib.read_json(path)
    if (isinstance(value, dict) and value.pop('sha256', None) == digest(value)
        and value.get('made_from') == sources and valid(value)):
      return value
    reason = 'made from another checkpoint, prior or settings, or damaged'
  except UserError:
    reason = 'damaged'
  except OSError:   # absent
    reason = None
  if reason:
    print(f"'{path}' is {reason}: computing it again", file=sys.stderr, flush=True)
  value = dict(compute(), made_from=sources)
  try:
    path.parent.mkdir(exist_ok=True)
    workdir_lib.write_json(path, dict(value, sha256=digest(value)))
  except OSError:
    pass
  return value


def fingerprint(folder):
  """SHA-256 (hex) of the files of the best checkpoint under `folder` (a run's or a prior's)."""
  best = pathlib.Path(folder) / 'checkpoints' / 'best'
  digest = hashlib.sha256()
  for path in sorted(best.rglob('*')):
    if path.is_file():
      digest.update(str(path.relative_to(best)).encode() + b'\0' + path.read_bytes())
  return digest.hexdigest()
