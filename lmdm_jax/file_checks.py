"""Checks for the model files we load (bundles, work directories, converted checkpoints): they are
untrusted data, read before anything is built from them.

What a file declares (a model config, array shapes in npz headers or orbax metadata) is compared
with what the declared model needs, computed without allocating (``nnx.eval_shape``), before any
array is read or any model is built; so a small file cannot make a loader allocate a large model
or read a large array. Every failure is a ``ModelFileError`` (a ValueError) with a one-line message
naming the file and the problem.
"""
from __future__ import annotations

import json
import os
import zipfile

import jax
import numpy as np
from flax import nnx

from lmdm_jax.config import DiTConfig, _short

META_MAX_BYTES = 1 << 20  # a bundle's __meta__ / a work directory's config.json (real: ~1 KB)
PARAM_DTYPES = ("float16", "float32")  # what save_bundle writes
_DEFLATE_MAX_RATIO = 1100  # deflate cannot expand a stream more than ~1032x


class ModelFileError(ValueError):
  """A model file (bundle, checkpoint, its metadata) that is damaged or does not match itself."""


def read_json(path: str, what: str, max_bytes: int = META_MAX_BYTES) -> dict:
  """A JSON object from a small file, or a ModelFileError naming ``what`` and the file."""
  try:
    size = os.path.getsize(path)
    if size > max_bytes:
      raise ModelFileError(f"{what} {path}: {size} bytes; more than the {max_bytes} allowed")
    with open(path, "rb") as f:
      return json_object(f.read(), f"{what} {path}")
  except OSError as e:
    raise ModelFileError(f"{what} {path}: cannot read ({e.strerror or e})") from None


def json_object(data: bytes, where: str) -> dict:
  try:
    d = json.loads(data.decode("utf-8"))
  except (UnicodeDecodeError, ValueError, RecursionError) as e:
    raise ModelFileError(f"{where}: not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None
  if not isinstance(d, dict):
    raise ModelFileError(f"{where}: expected a JSON object, got {type(d).__name__}")
  return d


def model_config(d, where: str) -> DiTConfig:
  """The DiTConfig a file declares (its ``model`` field), checked field by field."""
  try:
    return DiTConfig.from_stored(d)  # a stored model without `positions` is legacy
  except (TypeError, ValueError) as e:
    raise ModelFileError(f"{where}: {str(e)[:300]}") from None


def abstract_model(cfg: DiTConfig, where: str):
  """The DiT for ``cfg`` as shapes only (``nnx.eval_shape``: nothing allocated)."""
  from lmdm_jax.nn.dit import DiT
  try:
    return nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
  except Exception as e:  # noqa: BLE001 - a config the model cannot be built from
    raise ModelFileError(f"{where}: the declared model config cannot be built "
                         f"({type(e).__name__}: {str(e)[:160]})") from None


def path_str(path) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def flat_shapes(tree) -> dict:
  """{"a/b/c": (shape, dtype name)} of a pytree of arrays or shape structs."""
  return {path_str(p): (tuple(v.shape), np.dtype(v.dtype).name)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def param_shapes(abstract) -> dict:
  """{"a/b/c": (shape, dtype)} of an (abstract) model's ``nnx.Param`` leaves."""
  return flat_shapes(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


def compare(want: dict, got: dict, where: str, check_dtype: bool = True) -> None:
  """``want``/``got``: {name: (shape, dtype)}. A ModelFileError naming missing, unexpected and
  misshapen entries unless ``got`` holds exactly ``want``'s names and shapes."""
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  bad = sorted(k for k in set(want) & set(got) if tuple(want[k][0]) != tuple(got[k][0])
               or (check_dtype and want[k][1] != got[k][1]))
  if missing or extra or bad:
    raise ModelFileError(f"{where} does not match its config: missing {missing[:5]}, unexpected "
                         f"{extra[:5]}, misshapen "
                         f"{[(k, got[k], want[k]) for k in bad[:5]]}"[:600])


# ------------------------------------------------------------------------------------ npz files


def npz_headers(z: zipfile.ZipFile, where: str) -> dict:
  """{member name without .npy: (shape, dtype name, data bytes)} from each member's .npy header,
  read without decompressing the data. The sizes the zip directory declares must agree with the
  headers and be possible for the stored bytes, so reading a member allocates at most what the
  file can actually hold."""
  out = {}
  for info in z.infolist():
    name = info.filename
    if not name.endswith(".npy"):
      raise ModelFileError(f"{where}: unexpected member {_short(name)} (not an .npy array)")
    try:
      with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
          shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
          shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
          raise ValueError(f"unsupported .npy version {version}")
        header_len = f.tell()
    except Exception as e:  # noqa: BLE001 - zipfile/zlib/numpy report damage in many ways
      raise ModelFileError(f"{where}: member {_short(name)} has no valid array header "
                           f"({type(e).__name__}: {str(e)[:80]})") from None
    if dtype.hasobject or fortran:
      raise ModelFileError(f"{where}: member {_short(name)} holds {dtype} data; only plain "
                           "numeric arrays are read")
    nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if info.file_size != header_len + nbytes:
      raise ModelFileError(f"{where}: member {_short(name)} declares {info.file_size} bytes but "
                           f"its header {shape} {dtype} needs {header_len + nbytes}")
    limit = (info.compress_size if info.compress_type == zipfile.ZIP_STORED
             else _DEFLATE_MAX_RATIO * info.compress_size + 1024)
    if info.file_size > limit:
      raise ModelFileError(f"{where}: member {_short(name)} declares {info.file_size} bytes, more "
                           f"than its {info.compress_size} stored bytes can hold")
    out[name[:-4]] = (tuple(shape), dtype.name, nbytes)
  return out


def open_npz(path: str, what: str = "model bundle") -> zipfile.ZipFile:
  try:
    return zipfile.ZipFile(path)
  except Exception as e:  # noqa: BLE001 - zipfile reports damage in many ways
    raise ModelFileError(f"{what} {path!r}: not an .npz file ({type(e).__name__}: "
                         f"{str(e)[:80]})") from None


def read_npz_array(z: zipfile.ZipFile, name: str, where: str) -> np.ndarray:
  """One member's array (whose header ``npz_headers`` has checked), or a ModelFileError."""
  try:
    with z.open(name + ".npy") as f:
      return np.lib.format.read_array(f, allow_pickle=False)
  except Exception as e:  # noqa: BLE001 - zipfile/zlib/numpy report damage in many ways
    raise ModelFileError(f"{where}: array {_short(name)} is damaged ({type(e).__name__}: "
                         f"{str(e)[:80]})") from None


# ---------------------------------------------------------------------------- orbax checkpoints


def orbax_shapes(item_dir: str, where: str) -> dict:
  """{"a/b/c": (shape, dtype)} of the arrays an orbax PyTree item declares in its metadata (read
  without reading any array)."""
  import orbax.checkpoint as ocp
  from etils import epath
  h = ocp.PyTreeCheckpointHandler()
  try:
    m = h.metadata(epath.Path(item_dir))
    return flat_shapes(getattr(m, "tree", m))
  except Exception as e:  # noqa: BLE001 - unreadable metadata, in whatever way orbax reports it
    raise ModelFileError(f"{where}: unreadable checkpoint metadata ({type(e).__name__}: "
                         f"{str(e)[:120]})") from None
  finally:
    h.close()
