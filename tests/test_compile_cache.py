"""JAX's persistent compilation cache as the commands use it (lmdm_jax.compile_cache): where it
lives, the opt-out, and that a second process loads what the first compiled."""
import os
import subprocess
import sys

import pytest

from lmdm_jax import compile_cache

pytestmark = pytest.mark.slow  # child processes and the persistent cache (the full suite runs them)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# compile one small program; report the cache folder and the cache hits/misses JAX recorded
SCRIPT = """
import jax, jax.numpy as jnp
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
from lmdm_jax import compile_cache
d = compile_cache.enable()
jax.jit(lambda x: jnp.sin(x) * 2 + 1)(jnp.arange(5.0)).block_until_ready()
print(d, events.count("/jax/compilation_cache/cache_hits"),
      events.count("/jax/compilation_cache/cache_misses"))
"""


def _run(env):
  env = dict(env, PYTHONPATH=ROOT)
  r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                     timeout=300)
  assert r.returncode == 0, r.stderr
  folder, hits, misses = r.stdout.split()
  return folder, int(hits), int(misses)


def _env(**kw):
  env = {k: v for k, v in os.environ.items()
         if k not in (compile_cache.DIR_ENV, compile_cache.OFF_ENV, "XDG_CACHE_HOME")}
  env.update(kw)
  return env


def test_default_folder(monkeypatch, tmp_path):
  for k in (compile_cache.DIR_ENV, "XDG_CACHE_HOME"):
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert compile_cache.default_dir() == os.path.join(str(tmp_path), ".cache", "lmdm_jax", "jax")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.default_dir() == os.path.join(str(tmp_path / "xdg"), "lmdm_jax", "jax")
  monkeypatch.setenv(compile_cache.DIR_ENV, str(tmp_path / "mine"))
  assert compile_cache.default_dir() == str(tmp_path / "mine")


def test_opt_out(monkeypatch):
  for off in ("", "0", "false"):
    monkeypatch.setenv(compile_cache.OFF_ENV, off)
    assert not compile_cache.disabled_by_env()
  monkeypatch.setenv(compile_cache.OFF_ENV, "1")
  assert compile_cache.disabled_by_env()
  assert compile_cache.enable("/nonexistent/never/made") is None
  monkeypatch.delenv(compile_cache.OFF_ENV)
  assert compile_cache.enable("none") is None


def test_second_process_loads_from_the_cache(tmp_path):
  cache = tmp_path / "cache"
  folder, hits, misses = _run(_env(LMDM_COMPILE_CACHE=str(cache)))
  assert folder == str(cache) and hits == 0 and misses >= 1
  assert os.listdir(cache)  # every program is written, however fast it compiled
  folder, hits, misses = _run(_env(LMDM_COMPILE_CACHE=str(cache)))
  assert hits >= 1 and misses == 0


def test_unwritable_folder_turns_the_cache_off(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  said = []
  assert compile_cache.enable(str(blocker / "cache"), log=said.append) is None
  assert said and "cannot create" in said[0]
