"""lmdm_jax: Live Music Diffusion Models in JAX/Flax NNX.

``from lmdm_jax import load_system`` is the entry point (``lmdm_jax.system``); it is imported on
first use, so ``import lmdm_jax`` stays cheap.
"""

__all__ = ["System", "load_system"]


def __getattr__(name):
  if name in __all__:
    from lmdm_jax import system
    return getattr(system, name)
  raise AttributeError(f"module 'lmdm_jax' has no attribute {name!r}")
