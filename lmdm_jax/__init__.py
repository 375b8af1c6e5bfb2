"""lmdm_jax: Live Music Diffusion Models in JAX/Flax NNX.

``from lmdm_jax import load_system`` is the entry point (``lmdm_jax.system``); it is imported on
first use, so ``import lmdm_jax`` stays cheap.
"""

import sys

__all__ = ["System", "load_system"]


class _NoIPythonForFlax:
  """Start-up: flax.nnx and treescope (which flax imports) import IPython (over a second of CPU
  on 2 cores) only to ask whether this process runs inside IPython, or for notebook display
  helpers that work only there. When IPython is not imported yet, the process is not inside
  it: this import hook answers those imports (and only those) with ImportError, which they read
  as "not in IPython". Inside IPython the module is already loaded and no hook is consulted."""

  ASKING = ("flax.nnx.reprlib", "flax.nnx.summary", "flax.nnx.visualization",
            "treescope._internal.api.ipython_integration")

  def find_spec(self, name, path=None, target=None):
    if name != "IPython":
      return None
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("importlib."):
      frame = frame.f_back
    if frame is not None and frame.f_globals.get("__name__") in self.ASKING:
      raise ImportError("IPython is not running")
    return None


if "IPython" not in sys.modules and "flax.nnx" not in sys.modules:
  sys.meta_path.insert(0, _NoIPythonForFlax())


def __getattr__(name):
  if name in __all__:
    from lmdm_jax import system
    return getattr(system, name)
  raise AttributeError(f"module 'lmdm_jax' has no attribute {name!r}")
