"""`pip install .` into a fresh virtual environment, then the package and the `lmdm` command from
another folder: the installed copy (not the checkout) imports, finds its configs and data, and
`lmdm sample` writes audio with the bundled model. No network: the venv sees this Python's
packages (--system-site-packages) and builds with its setuptools (--no-build-isolation)."""
import os
import shutil
import subprocess
import sys

import pytest
import soundfile as sf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

# what the checkout holds that a build must not see (outputs, caches, build leftovers)
IGNORE = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", "build", "dist", "*.egg-info",
                                ".pytest_cache", "outputs", "runs", "data_cache", ".venv", ".whl")


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
  """(python of a venv with the package installed, a folder outside the checkout)."""
  base = tmp_path_factory.mktemp("install")
  src = base / "src"
  shutil.copytree(ROOT, src, ignore=IGNORE)  # an in-tree build writes build/ and egg-info
  # --without-pip: this Python's own pip and setuptools run in the venv (ensurepip's bundled
  # setuptools may predate building wheels without the `wheel` package)
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                  str(base / "venv")], check=True)
  py = str(base / "venv" / "bin" / "python")
  r = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                      str(src)], capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  elsewhere = base / "elsewhere"
  elsewhere.mkdir()
  return py, elsewhere


def _env():
  return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _py(venv, code):
  py, elsewhere = venv
  r = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd=elsewhere,
                     env=_env(), timeout=300)
  assert r.returncode == 0, r.stderr
  return r.stdout.strip()


def test_the_installed_package_is_imported_with_its_files(venv):
  py, _ = venv
  site = _py(venv, "import os, lmdm_jax; print(os.path.dirname(lmdm_jax.__file__))")
  assert site.startswith(os.path.dirname(os.path.dirname(py))) and "site-packages" in site
  # every module and data file of the checkout's package, and every config, is installed
  want = set()
  for d, dirs, files in os.walk(os.path.join(ROOT, "lmdm_jax")):
    dirs[:] = [x for x in dirs if x != "__pycache__"]
    want |= {os.path.relpath(os.path.join(d, f), os.path.join(ROOT, "lmdm_jax")) for f in files
             if not f.endswith(".pyc")}
  want |= {os.path.join("configs", f) for f in os.listdir(os.path.join(ROOT, "configs"))
           if f.endswith(".py")}
  have = set()
  for d, dirs, files in os.walk(site):
    dirs[:] = [x for x in dirs if x != "__pycache__"]
    have |= {os.path.relpath(os.path.join(d, f), site) for f in files}
  assert not want - have, f"not installed: {sorted(want - have)}"
  # the configs load from the installed copy (arc_demo loads demo in turn)
  out = _py(venv, "from lmdm_jax import config; c = config.load_config('arc_demo'); "
                  "print(config.CONFIG_DIR, c.name)")
  assert out == f"{os.path.join(site, 'configs')} arc_demo"


def test_lmdm_sample_from_another_folder(venv):
  py, elsewhere = venv
  lmdm = os.path.join(os.path.dirname(py), "lmdm")
  r = subprocess.run([lmdm, "--help"], capture_output=True, text=True, cwd=elsewhere, timeout=60)
  assert r.returncode == 0 and all(c in r.stdout for c in ("sample", "jam", "serve", "train",
                                                           "arc", "convert", "bundle"))
  r = subprocess.run([lmdm, "sample", "--seconds", "2", "--out", "x.wav", "--no-progress"],
                     capture_output=True, text=True, cwd=elsewhere, env=_env(),
                     timeout=900)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "site-packages" in r.stdout and "demo_model.npz" in r.stdout  # the bundled model
  info = sf.info(str(elsewhere / "x.wav"))
  assert info.samplerate == 22050 and info.channels == 1 and info.duration >= 2.0
