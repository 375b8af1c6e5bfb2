import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmdm_jax import compile_cache  # noqa: E402

# The tests, and the commands they start, use JAX's persistent compilation cache as the commands
# do (~/.cache/lmdm_jax/jax; LMDM_COMPILE_CACHE=DIR elsewhere, LMDM_NO_COMPILE_CACHE=1 off): most
# of the tests' time is compiling the same programs, so a second run takes a fraction of the
# first. Cached programs are keyed by their content and the JAX version: results are the same.
compile_cache.enable()  # in this process too, before anything compiles
