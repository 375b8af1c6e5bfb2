import atexit
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The commands the tests start use JAX's persistent compilation cache (lmdm_jax.compile_cache):
# one fresh folder for this test session, shared by its processes, never the user's cache.
if "LMDM_COMPILE_CACHE" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="lmdm_jax_test_cache_")
  os.environ["LMDM_COMPILE_CACHE"] = _cache
  atexit.register(shutil.rmtree, _cache, True)
