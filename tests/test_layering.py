"""Imports run one way: the package's layers, lowest first, each importing only its own layer and
those below; the library never imports the top-level scripts (train.py, sample.py, arc.py) or the
checkout's other folders, and never edits sys.path. Read from the source (ast), including imports
inside functions, so a lazy import is held to the same rule."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "lmdm_jax")

# Lowest first. A module belongs to the layer of its longest listed prefix ("lmdm_jax" itself,
# the package's __init__, only to "base": a new top-level module must be given a layer here).
LAYERS = [
    ("base", ["lmdm_jax", "lmdm_jax.config", "lmdm_jax.compile_cache", "lmdm_jax.file_checks",
              "lmdm_jax.nn"]),
    ("convert", ["lmdm_jax.convert"]),  # checkpoints of the authors' code -> nn modules
    ("core", ["lmdm_jax.layouts", "lmdm_jax.cache", "lmdm_jax.sampling", "lmdm_jax.text",
              "lmdm_jax.codecs", "lmdm_jax.data", "lmdm_jax.music_metrics", "lmdm_jax.testing",
              "lmdm_jax.clip_sampling", "lmdm_jax.quantize", "lmdm_jax.limiter"]),
    ("training", ["lmdm_jax.training"]),
    # whole systems from any source; the converter's loader and exporter read every source
    ("loading", ["lmdm_jax.bundle", "lmdm_jax.checkpoint_io", "lmdm_jax.system",
                 "lmdm_jax.sources", "lmdm_jax.jamming", "lmdm_jax.serving", "lmdm_jax.convert.load",
                 "lmdm_jax.convert.export", "lmdm_jax.convert.__main__"]),
    ("apps", ["lmdm_jax.apps", "lmdm_jax.__main__"]),
]
RANK = {prefix: (i, name) for i, (name, prefixes) in enumerate(LAYERS) for prefix in prefixes}


def layer_of(module: str):
  """(rank, name) of the longest listed prefix of ``module``, or None."""
  if module == "lmdm_jax":
    return RANK[module]
  parts = module.split(".")
  for n in range(len(parts), 1, -1):
    hit = RANK.get(".".join(parts[:n]))
    if hit is not None:
      return hit
  return None


def module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
  return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def imports(source: str, module: str, is_package: bool):
  """(line, imported module) for every import in ``source``, at any depth. ``from a import b``
  yields ``a.b`` (b may be a submodule) as well as ``a``; relative imports are resolved."""
  here = module.split(".") if is_package else module.split(".")[:-1]
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = here[:len(here) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
      else:
        mod = node.module
      yield node.lineno, mod
      for alias in node.names:
        yield node.lineno, f"{mod}.{alias.name}"
    elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
          and node.args and isinstance(node.args[0], ast.Constant)
          and isinstance(node.args[0].value, str)):
      yield node.lineno, node.args[0].value


def top_level_names() -> set:
  """Importable names of the checkout that are not the package: scripts and folders."""
  names = set()
  for entry in os.listdir(ROOT):
    if entry.endswith(".py"):
      names.add(entry[:-3])
    elif (os.path.isdir(os.path.join(ROOT, entry)) and not entry.startswith(".")
          and entry != "lmdm_jax"):
      names.add(entry)
  return names


def violations(path: str, source: str, module: str, scripts: set) -> list[str]:
  rel = os.path.relpath(path, ROOT)
  # the package's __init__ is the facade: it re-exports the System lazily (``__getattr__``), so
  # it may name any layer, while importing ``lmdm_jax`` itself costs a lower module nothing
  own = (len(LAYERS), "facade") if module == "lmdm_jax" else layer_of(module)
  out = []
  if own is None:
    return [f"{rel}: module {module} is in no layer; add it to LAYERS in tests/test_layering.py"]
  for line, name in imports(source, module, path.endswith("__init__.py")):
    top = name.split(".")[0]
    if top in scripts:
      out.append(f"{rel}:{line} imports {name!r}, a top-level script/folder of the checkout: the "
                 "library must not (move the code it needs into lmdm_jax)")
    elif top == "lmdm_jax":
      theirs = layer_of(name)
      if theirs is not None and theirs[0] > own[0]:
        out.append(f"{rel}:{line} imports {name}: layer {own[1]!r} must not import the higher "
                   f"layer {theirs[1]!r} (order: {' < '.join(n for n, _ in LAYERS)}); move the "
                   "code it needs down a layer")
  return out


def library_files():
  for d, _, files in os.walk(PKG):
    for f in sorted(files):
      if f.endswith(".py"):
        yield os.path.join(d, f)


def test_imports_run_one_way():
  scripts = top_level_names()
  found = []
  for path in library_files():
    with open(path) as f:
      found += violations(path, f.read(), module_name(path), scripts)
  assert not found, "layering violations:\n  " + "\n  ".join(found)


def test_library_never_edits_sys_path():
  found = []
  for path in library_files():
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and node.attr == "path"
          and isinstance(node.value, ast.Name) and node.value.id == "sys"):
        found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
  assert not found, f"sys.path used in the library (import through the package instead): {found}"


@pytest.mark.parametrize("module,source,needle", [
    # a lazy import inside a function counts
    ("lmdm_jax.nn.fake", "def f():\n  from lmdm_jax.convert import t5\n", "'base' must not import"),
    ("lmdm_jax.training.fake", "from lmdm_jax.apps.common import UsageError\n", "'apps'"),
    ("lmdm_jax.training.fake", "from ..apps import common\n", "'apps'"),  # relative
    ("lmdm_jax.bundle", "def g():\n  from arc import load_arc_model\n", "top-level script"),
    ("lmdm_jax.apps.fake", "import importlib\nimportlib.import_module('train')\n", "top-level"),
    ("lmdm_jax.newthing", "import numpy\n", "in no layer"),
])
def test_checker_catches(module, source, needle):
  """The checker itself: each of these sources is a violation it must name."""
  path = os.path.join(ROOT, *module.split(".")) + ".py"
  found = violations(path, source, module, top_level_names())
  assert found and needle in found[0], found


def test_checker_allows_downward_imports():
  path = os.path.join(PKG, "apps", "fake.py")
  src = "from lmdm_jax.training import workdir\nfrom lmdm_jax.nn.dit import DiT\nimport numpy\n"
  assert violations(path, src, "lmdm_jax.apps.fake", top_level_names()) == []


def test_package_exports_the_system_lazily():
  """``from lmdm_jax import load_system`` (the README's entry point) works, and importing the
  package alone does not import the System (its start-up stays cheap)."""
  code = ("import sys, lmdm_jax; assert 'lmdm_jax.system' not in sys.modules; "
          "from lmdm_jax import load_system, System; "
          "assert load_system.__module__ == 'lmdm_jax.system' and System.__name__ == 'System'")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
