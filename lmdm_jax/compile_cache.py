"""JAX's persistent compilation cache, on by default in every command (sample, jam, serve, train,
arc, bench/startup.py): the second run of a command loads its compiled programs from disk
instead of compiling them again (on CPU the block step alone takes 10-35 s to compile).

The folder is ``$LMDM_COMPILE_CACHE`` when set, else ``$XDG_CACHE_HOME/lmdm_jax/jax`` (default
``~/.cache/lmdm_jax/jax``). ``LMDM_NO_COMPILE_CACHE=1`` turns it off. Every program is cached,
however fast it compiled or small it is (JAX's defaults skip those under 1 s of compile time,
which would leave most of a start-up uncached). Entries are keyed by the program, the JAX/XLA
version and the device, so a stale entry is never used; deleting the folder is always safe.
"""
from __future__ import annotations

import os

OFF_ENV = "LMDM_NO_COMPILE_CACHE"
DIR_ENV = "LMDM_COMPILE_CACHE"


def default_dir() -> str:
  """``$LMDM_COMPILE_CACHE``, else the user cache folder's ``lmdm_jax/jax``."""
  if os.environ.get(DIR_ENV):
    return os.environ[DIR_ENV]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "lmdm_jax", "jax")


def disabled_by_env() -> bool:
  """True when ``$LMDM_NO_COMPILE_CACHE`` is set to anything but '', '0' or 'false'."""
  return os.environ.get(OFF_ENV, "").strip().lower() not in ("", "0", "false", "no")


def enable(path: str | None = None, log=None) -> str | None:
  """Turns the persistent compilation cache on in ``path`` (default ``default_dir()``) for every
  compile from now on in this process. Returns the folder, or None when the cache stays off:
  ``path`` is 'none', ``$LMDM_NO_COMPILE_CACHE`` is set, or the folder cannot be created (then
  ``log``, when given, says why). Calling it again with the same folder changes nothing."""
  if disabled_by_env() or (path is not None and path.lower() == "none"):
    return None
  path = os.path.abspath(os.path.expanduser(path or default_dir()))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    if log is not None:
      log(f"compilation cache off: cannot create {path} ({e})")
    return None
  import jax
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return path
