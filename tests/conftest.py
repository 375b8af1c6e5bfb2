import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmdm_jax import compile_cache  # noqa: E402

# The tests, and the commands they start, use JAX's persistent compilation cache as the commands
# do (~/.cache/lmdm_jax/jax; LMDM_COMPILE_CACHE=DIR elsewhere, LMDM_NO_COMPILE_CACHE=1 off): most
# of the tests' time is compiling the same programs, so a second run takes a fraction of the
# first. Cached programs are keyed by their content and the JAX version: results are the same.
compile_cache.enable()  # in this process too, before anything compiles


def _slow_deselected(config) -> bool:
  """True when the -m expression leaves out tests marked only ``slow`` (e.g. -m "not slow")."""
  expr = config.getoption("markexpr", "") or ""
  if not expr:
    return False
  try:
    from _pytest.mark.expression import Expression
    return not Expression.compile(expr).evaluate(lambda name, **kw: name == "slow")
  except Exception:  # noqa: BLE001 - another pytest: collect everything, -m still deselects
    return False


def _module_marked_slow(path) -> bool:
  """The module sets ``pytestmark`` to (a list with) ``pytest.mark.slow``: read, not imported."""
  import ast
  try:
    tree = ast.parse(path.read_text())
  except (OSError, SyntaxError, ValueError):
    return False
  return any(isinstance(node, ast.Assign)
             and any(getattr(t, "id", None) == "pytestmark" for t in node.targets)
             and "mark.slow" in ast.unparse(node.value) for node in tree.body)


def pytest_ignore_collect(collection_path, config):
  """With slow tests left out, a module marked slow as a whole is not even imported (the PyTorch
  parity modules alone take seconds to import torch and stable-audio-tools)."""
  if (collection_path.suffix == ".py" and collection_path.name.startswith("test_")
      and _slow_deselected(config) and _module_marked_slow(collection_path)):
    return True
  return None
