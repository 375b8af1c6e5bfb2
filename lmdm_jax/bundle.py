"""The bundled model: a trained model's parameters in one small ``.npz`` (half precision), with its
config, so the README's first command makes music with no download.

Layout of the file: ``param/<path>`` arrays (float16 by default; the path is the NNX state path
joined by ``/``; an ARC-Forcing model is stored with its adapters merged), ``__meta__`` (a JSON string: config name, model config, training step, provenance). Only
``nnx.Param`` leaves are stored; buffers (the LayerNorm zero bias, rotary ``inv_freq``) are
rebuilt by the model constructor. Loading checks every stored leaf against the model built
from the stored config: missing, unexpected or misshapen leaves are errors naming them.

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

from lmdm_jax.config import DiTConfig
from lmdm_jax.nn.dit import DiT

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
  with np.load(path) as z:
    if "__meta__" not in z.files:
      raise ValueError(f"{path}: not a model bundle (no __meta__ entry)")
    return json.loads(bytes(z["__meta__"]).decode())


def load_bundle(path: str):
  """-> (DiTConfig, DiT (float32 parameters), meta dict)."""
  if not os.path.isfile(path):
    raise ValueError(f"model bundle {path!r}: no such file")
  meta = read_meta(path)
  cfg = DiTConfig.from_stored(meta["model"])
  model = DiT(cfg, rngs=nnx.Rngs(0))
  want = flat_params(model)
  with np.load(path) as z:
    got = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  bad = sorted(k for k in set(want) & set(got) if want[k].shape != got[k].shape)
  if missing or extra or bad:
    raise ValueError(f"model bundle {path!r} does not match its config: missing {missing[:5]}, "
                     f"unexpected {extra[:5]}, misshapen "
                     f"{[(k, got[k].shape, want[k].shape) for k in bad[:5]]}")
  st = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(st)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
  new = [np.asarray(got[_path_str(p)], np.float32) for p, _ in leaves]
  nnx.replace_by_pure_dict(st, jax.tree_util.tree_unflatten(treedef, new))
  nnx.update(model, st)
  return cfg, model, meta


def export_workdir(workdir: str, out: str, use_ema: bool = True, dtype=np.float16,
                   extra_meta: dict | None = None) -> str:
  """A train.py work directory's latest checkpoint -> bundle (EMA weights by default)."""
  from lmdm_jax.checkpoint_io import load_model
  cfg, model, ex = load_model(workdir, use_ema=use_ema)
  meta = dict(config=ex["meta"]["config"], step=ex["step"], weights="ema" if use_ema else "raw",
              source=os.path.abspath(workdir), data=ex["meta"].get("data"))
  meta.update(extra_meta or {})
  return save_bundle(model, out, meta, dtype)


def export_arc(arc_workdir: str, out: str, dtype=np.float16, extra_meta: dict | None = None) -> str:
  """An arc.py run (its recorded base + latest adapter) -> bundle with the adapter merged."""
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:
    sys.path.insert(0, root)
  from arc import ARC_DIR, _ckpt_dir, load_arc_model

  from lmdm_jax.training.checkpoints import latest_step
  with open(os.path.join(arc_workdir, "arc_config.json")) as f:
    rec = json.load(f)
  arc_step = latest_step(os.path.join(arc_workdir, ARC_DIR))
  base_step = rec.get("base_step")
  if base_step is None and rec.get("base"):  # runs recorded before the pin: the base's latest,
    base_step = latest_step(_ckpt_dir(rec["base"]))  # as load_arc_model loads it
  model = load_arc_model(arc_workdir, merge=True)
  meta = dict(config=rec["config"], weights="base + merged ARC-Forcing adapter",
              source=os.path.abspath(arc_workdir), base=rec.get("base"),
              base_step=base_step, arc_step=arc_step, data=rec.get("data"))
  meta.update(extra_meta or {})
  return save_bundle(model, out, meta, dtype)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("workdir", help="a train.py work directory (or, with --arc, an arc.py one)")
  ap.add_argument("--arc", action="store_true", help="workdir is an arc.py run: merge its adapter")
  ap.add_argument("--out", default=DEFAULT_BUNDLE)
  ap.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
  ap.add_argument("--float32", action="store_true", help="store float32 (default float16)")
  ap.add_argument("--meta", default="{}", help="extra JSON metadata to record")
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
