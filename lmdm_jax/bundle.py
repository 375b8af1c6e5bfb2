"""The bundled model: a trained model's parameters in one small ``.npz`` (half precision), with its
config, so the README's first command makes music with no download.

Layout of the file: ``param/<path>`` arrays (float16 by default; the path is the NNX state path
joined by ``/``; an ARC-Forcing model is stored with its adapters merged), ``__meta__`` (a JSON
string: config name, model config, training step, provenance: folder names only). Only
``nnx.Param`` leaves are stored; buffers (the LayerNorm zero bias, rotary ``inv_freq``) are
rebuilt by the model constructor. A bundle is untrusted data: loading checks the stored config
and every stored array's header against the shapes that config implies before building the
model or reading an array (missing, unexpected or misshapen leaves are errors naming them), and
the config name it records is looked up among the registered configs only, never run.

  python3 -m lmdm_jax.bundle runs/demo --out lmdm_jax/assets/demo_model.npz   # export (EMA)
  python3 -m lmdm_jax.bundle --arc runs/arc_demo --out lmdm_jax/assets/demo_arc.npz   # ARC merged
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile

import jax
import numpy as np
from flax import nnx

from lmdm_jax import file_checks as fc
from lmdm_jax.config import registered_spec
from lmdm_jax.nn.dit import DiT, model_with_params

ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_BUNDLE = os.path.join(ASSET_DIR, "demo_model.npz")


def _path_str(path) -> str:
  return "/".join(str(getattr(p, "key", p)) for p in path)


def flat_params(model, kind=nnx.Param) -> dict:
  """{"a/b/c": np.ndarray} of the model's ``kind`` leaves."""
  st = nnx.state(model, kind)
  return {_path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(
      nnx.to_pure_dict(st))[0]}


def save_bundle(model: DiT, path: str, meta: dict, dtype=np.float16) -> str:
  """Writes ``path`` atomically. ``meta`` must hold ``config`` (a config name) and is stored
  with the model's DiTConfig."""
  arrays = {f"param/{k}": v.astype(dtype) for k, v in flat_params(model).items()}
  full = dict(meta, model=dataclasses.asdict(model.cfg), dtype=np.dtype(dtype).name)
  arrays["__meta__"] = np.frombuffer(json.dumps(full).encode(), np.uint8)
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".npz", dir=d)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez_compressed(f, **arrays)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def read_meta(path: str) -> dict:
  """The bundle's ``__meta__`` (a JSON object), read without reading any parameter."""
  where = f"model bundle {path!r}"
  with fc.open_npz(path) as z:
    return _meta(z, fc.npz_headers(z, where), where)


def _meta(z, heads: dict, where: str) -> dict:
  if "__meta__" not in heads:
    raise fc.ModelFileError(f"{where}: not a model bundle (no __meta__ entry)")
  shape, dtype, nbytes = heads["__meta__"]
  if dtype != "uint8" or len(shape) != 1 or nbytes > fc.META_MAX_BYTES:
    raise fc.ModelFileError(f"{where}: __meta__ must be JSON text of at most "
                            f"{fc.META_MAX_BYTES} bytes, got a {dtype} array of shape {shape}")
  return fc.json_object(fc.read_npz_array(z, "__meta__", where).tobytes(), f"{where} __meta__")


def load_bundle(path: str):
  """-> (DiTConfig, DiT (float32 parameters), meta dict).

  The file is untrusted: its declared config (``__meta__["model"]``) is checked field by field,
  the parameter shapes it implies are computed without allocating, and every stored array's
  header (name, shape, dtype, size) must match them before the model is built or any array is
  read. Errors are ``ModelFileError`` (ValueError) naming the file and the problem.
  """
  if not os.path.isfile(path):
    raise ValueError(f"model bundle {path!r}: no such file")
  where = f"model bundle {path!r}"
  with fc.open_npz(path) as z:
    heads = fc.npz_headers(z, where)
    meta = _meta(z, heads, where)
    cfg = fc.model_config(meta.get("model"), f"{where} __meta__ model")
    abstract = fc.abstract_model(cfg, where)
    want = fc.param_shapes(abstract)
    got = {k[len("param/"):]: v[:2] for k, v in heads.items() if k.startswith("param/")}
    got.update({k: v[:2] for k, v in heads.items()  # anything else is unexpected
                if k != "__meta__" and not k.startswith("param/")})
    fc.compare(want, got, where, check_dtype=False)
    odd = sorted(k for k, (_, dt) in got.items() if dt not in fc.PARAM_DTYPES)
    if odd:
      raise fc.ModelFileError(f"{where}: parameters must be {list(fc.PARAM_DTYPES)}; "
                              f"{odd[0]} is {got[odd[0]][1]}")
    # only now: the file holds exactly this model's arrays
    st = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(st)
    # device_put, not jnp.asarray: that compiles a copy program per shape (18 of them)
    new = [jax.device_put(np.asarray(fc.read_npz_array(z, "param/" + _path_str(p), where),
                                     np.float32)) for p, _ in leaves]
  model = model_with_params(abstract, jax.tree_util.tree_unflatten(treedef, new))
  return cfg, model, meta


def _provenance(path) -> str | None:
  """A folder's name only (a run, its base, its data): a bundle is shared, and the folders of
  the machine that made it are not recorded (``runs/demo`` and ``/home/me/runs/demo`` both give
  ``demo``; ``synthetic`` stays ``synthetic``)."""
  return os.path.basename(os.path.normpath(str(path))) if path else None


def _data_provenance(spec) -> str | None:
  """A ``--data`` value's folder names only, weights kept (``data_cache/rec:0.5,/x/wide:0.5`` ->
  ``rec:0.5,wide:0.5``; see ``_provenance``)."""
  if not spec:
    return None
  from lmdm_jax.training.data import spec_entries
  return ",".join(_provenance(f) + ("" if w is None else f":{w}") for f, w in spec_entries(spec))


def export_workdir(workdir: str, out: str, use_ema: bool = True, dtype=np.float16,
                   extra_meta: dict | None = None) -> str:
  """A train.py work directory's latest checkpoint -> bundle (EMA weights by default)."""
  from lmdm_jax.checkpoint_io import load_model
  cfg, model, ex = load_model(workdir, use_ema=use_ema)
  name = ex["meta"].get("config")
  meta = dict(config=registered_spec(name) or name, overrides=ex["meta"].get("overrides"),
              step=ex["step"],
              weights="ema" if use_ema else "raw", source=_provenance(workdir),
              data=_data_provenance(ex["meta"].get("data")))
  meta.update(extra_meta or {})
  return save_bundle(model, out, meta, dtype)


def export_arc(arc_workdir: str, out: str, dtype=np.float16, extra_meta: dict | None = None) -> str:
  """An arc.py run (its recorded base + latest adapter) -> bundle with the adapter merged."""
  from lmdm_jax.training.arc_run import ARC_DIR, load_arc_model
  from lmdm_jax.training.checkpoints import latest_step
  from lmdm_jax.training.workdir import checkpoint_dir
  with open(os.path.join(arc_workdir, "arc_config.json")) as f:
    rec = json.load(f)
  arc_step = latest_step(os.path.join(arc_workdir, ARC_DIR))
  base_step = rec.get("base_step")
  if base_step is None and rec.get("base"):  # runs recorded before the pin: the base's latest,
    base_step = latest_step(checkpoint_dir(rec["base"]))  # as load_arc_model loads it
  model = load_arc_model(arc_workdir, merge=True)
  meta = dict(config=registered_spec(rec["config"]) or rec["config"],
              overrides=rec.get("overrides"), weights="base + merged ARC-Forcing adapter",
              source=_provenance(arc_workdir), base=_provenance(rec.get("base")),
              base_step=base_step, arc_step=arc_step, data=_data_provenance(rec.get("data")))
  meta.update(extra_meta or {})
  return save_bundle(model, out, meta, dtype)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("workdir", help="a train.py work directory (or, with --arc, an arc.py one)")
  ap.add_argument("--arc", action="store_true", help="workdir is an arc.py run: merge its adapter")
  ap.add_argument("--out", required=True,
                  help="the bundle to write (required: to replace the shipped model, name "
                       "lmdm_jax/assets/demo_model.npz explicitly)")
  ap.add_argument("--raw", action="store_true",
                  help="the raw weights instead of the EMA (default: EMA)")
  ap.add_argument("--float32", action="store_true", help="store float32 (default: float16)")
  ap.add_argument("--meta", default="{}", help="extra JSON metadata to record (default: {})")
  args = ap.parse_args(argv)
  dtype = np.float32 if args.float32 else np.float16
  if args.arc:
    out = export_arc(args.workdir, args.out, dtype, json.loads(args.meta))
  else:
    out = export_workdir(args.workdir, args.out, use_ema=not args.raw, dtype=dtype,
                         extra_meta=json.loads(args.meta))
  print(f"[bundle] wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB)")


if __name__ == "__main__":
  main()
