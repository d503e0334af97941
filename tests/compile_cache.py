"""Environment for the subprocesses of the CLI and notebook tests.

They import this checkout and share one persistent compilation cache, so
programs of the same shapes (the folds of a cross-validation, a second
evaluation of a run) compile once per test session.
"""
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def environment(cache_dir):
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(cache_dir),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
