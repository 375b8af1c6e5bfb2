"""JAX's persistent compilation cache, on by default in every command (sample, jam, serve, train,
arc, bench/startup.py): the second run of a command loads its compiled programs from disk
instead of compiling them again (on CPU the block step alone takes 10-35 s to compile).

The folder is ``$LMDM_COMPILE_CACHE`` when set, else ``$XDG_CACHE_HOME/lmdm_jax/jax`` (default
``~/.cache/lmdm_jax/jax``). ``LMDM_NO_COMPILE_CACHE=1`` turns it off. Every program is cached,
however fast it compiled or small it is (JAX's defaults skip those under 1 s of compile time,
which would leave most of a start-up uncached). Entries are keyed by the program, the JAX/XLA
version and the device, so a stale entry is never used; deleting the folder is always safe.

``compile_program`` compiles a program ahead of time and, with the cache on, also keeps the
traced program (``jax.export``, StableHLO) in the folder's ``exported/``: a warm start then skips
tracing and lowering (about 1 s of CPU for the block program on 2 cores) and the backend compile
comes from the persistent cache. Exported programs are keyed by the program's name, the argument
shapes, the JAX version, the backend and a hash of this package's source, so an edit of the code
never reuses an old program. They are data (a flatbuffer of StableHLO), never executed as Python;
one that cannot be read is traced again and rewritten.
"""
from __future__ import annotations

import hashlib
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
  global _folder
  _folder = path
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return path


_folder: str | None = None  # the cache folder enable() turned on, if any
_source_hash: str | None = None
COMPILES = {"traced": 0, "exported": 0}  # programs compile_program built, by how they were built


def source_hash() -> str:
  """sha256 of this package's Python source (every ``lmdm_jax/**/*.py``), computed once."""
  global _source_hash
  if _source_hash is None:
    root = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for d, dirs, files in os.walk(root):
      dirs.sort()
      for f in sorted(files):
        if f.endswith(".py"):
          h.update(os.path.relpath(os.path.join(d, f), root).encode())
          with open(os.path.join(d, f), "rb") as fh:
            h.update(fh.read())
    _source_hash = h.hexdigest()
  return _source_hash


def _exported_path(name: str, key: str, leaves, treedef, donate) -> str | None:
  if _folder is None or disabled_by_env():
    return None
  import jax
  import jaxlib
  dev = jax.devices()[0]
  h = hashlib.sha256("\n".join([
      name, key, os.environ.get("LMDM_ATTENTION", ""), jax.__version__, getattr(jaxlib, "__version__", ""), jax.default_backend(),
      dev.device_kind, str(treedef), repr(tuple(donate)),
      repr([(tuple(x.shape), str(x.dtype)) for x in leaves]), source_hash()]).encode())
  return os.path.join(_folder, "exported", f"{name}-{h.hexdigest()[:32]}.jax")


def compile_program(name: str, fn, args: tuple, *, donate_argnums=(), out_like=None,
                    key: str = "", log=None):
  """``jax.jit(fn, donate_argnums).lower(*args).compile()``, as a callable with ``fn``'s
  arguments and results (pytrees). With the cache on (``enable``) and ``out_like`` given (any
  pytree with the structure of ``fn``'s results), the traced program is exported to the cache
  folder on first use and loaded from there afterwards (see the module docstring); ``key`` names
  whatever ``fn`` closes over that the arguments' shapes do not show (configs, static
  settings). ``COMPILES`` counts the programs built."""
  import jax
  leaves, treedef = jax.tree.flatten(args)
  donate = tuple(donate_argnums)
  path = None if out_like is None else _exported_path(name, key, leaves, treedef, donate)
  if path is None:
    COMPILES["traced"] += 1
    return jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  bounds, n = [], 0  # leaf ranges of the positional arguments, for donation
  for a in args:
    k = len(jax.tree.leaves(a))
    bounds.append((n, n + k))
    n += k
  flat_donate = tuple(i for a in donate for i in range(*bounds[a]))
  out_tree = jax.tree.structure(out_like)
  exported = _load_exported(path, len(leaves), out_tree.num_leaves, log)
  if exported is None:
    from jax import export

    def flat(*xs):
      return jax.tree.leaves(fn(*jax.tree.unflatten(treedef, xs)))

    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    exported = export.export(jax.jit(flat))(*specs)
    if exported.out_tree.num_leaves != out_tree.num_leaves:
      raise ValueError(f"{name}: out_like has {out_tree.num_leaves} leaves, the program returns "
                       f"{exported.out_tree.num_leaves}")
    try:
      data = exported.serialize()
    except ImportError as e:  # serialization needs the flatbuffers package
      if log is not None:
        log(f"compilation cache: programs not exported ({e})")
    else:
      _store(path, data, log)
    COMPILES["traced"] += 1
  else:
    COMPILES["exported"] += 1
  compiled = jax.jit(exported.call, donate_argnums=flat_donate).lower(*leaves).compile()

  def call(*xs):
    return jax.tree.unflatten(out_tree, compiled(*jax.tree.leaves(xs)))

  return call


def _load_exported(path: str, n_in: int, n_out: int, log):
  """The exported program at ``path`` when it exists, reads and fits; else None (and a damaged
  file is removed)."""
  if not os.path.isfile(path):
    return None
  try:
    from jax import export
    with open(path, "rb") as f:
      exp = export.deserialize(bytearray(f.read()))
    if len(exp.in_avals) != n_in or len(exp.out_avals) != n_out:
      raise ValueError("argument or result count differs")
    return exp
  except Exception as e:  # noqa: BLE001 - a damaged or foreign file: trace again
    if log is not None:
      log(f"compilation cache: ignoring {path} ({type(e).__name__}: {str(e)[:80]})")
    try:
      os.remove(path)
    except OSError:
      pass
    return None


def _store(path: str, data: bytes, log) -> None:
  """Write atomically (a temporary file renamed); a failure only costs the next start."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except OSError as e:
    if log is not None:
      log(f"compilation cache: cannot write {path} ({e})")
