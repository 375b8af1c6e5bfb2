"""Stage-1 training: teacher-forced streaming sequences, sharded, checkpointed, resumable.

  python3 train.py --config tiny --data synthetic --workdir runs/tiny --steps 200
  python3 train.py --config configs/demo.py --data data_cache/latents --workdir runs/demo
  python3 train.py ... --fsdp 4            # shard params/optimizer over 4 of the devices
  python3 train.py ... --coordinator HOST:PORT --num-processes N --process-id I   # each process

A run restarted with the same command resumes from its last checkpoint and continues with the
same data order, noise and losses as an uninterrupted run (data and PRNG keys depend only on the
seed and the step). Metrics go to <workdir>/metrics.jsonl (one JSON object per logged step).
Every ``--sample-every`` steps the EMA model streams ``--sample-seconds`` of a held-out prompt
into <workdir>/samples/step_NNNNNNN.wav (decoded with the config's codec; latents .npy without).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from lmdm_jax import compile_cache
from lmdm_jax.config import DiTConfig, load_cli_config
from lmdm_jax.nn.dit import DiT
from lmdm_jax.training import distributed, sharding
from lmdm_jax.training.checkpoints import Checkpointer, abstract_like, latest_step, run_layout
from lmdm_jax.training.data import Batcher, make_source
from lmdm_jax.training.stage1 import Stage1, Stage1Config
from lmdm_jax.training.workdir import truncate_metrics


def _train_defaults(conf):
  t = conf.get("train", None)
  d = dict(batch_size=8, steps=1000, ckpt_every=100, keep=3, log_every=10, eval_every=100,
           eval_batches=2, fsdp=1, sample_every=0, sample_seconds=10.0, stage1={})
  if t is not None:
    d.update({k: (dict(v) if k == "stage1" else v) for k, v in dict(t).items()})
  return d


def write_sample(graphdef, state, conf, cfg: DiTConfig, caption: str, path: str,
                 seconds: float, seed: int = 0) -> str:
  """Streams ``seconds`` of ``caption`` with the EMA weights of ``state`` through the System of
  the config; writes a WAV (or the latents as .npy when the config has no codec). Returns the
  written path."""
  from lmdm_jax import sources
  from lmdm_jax.training.stage1 import model_from_state
  model = model_from_state(graphdef, jax.device_get(state), use_ema=True)
  system = sources.assemble(model, conf, log=lambda *_: None)
  out = system.generate(caption, seconds, seed=seed, plus_plus=False)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if system.codec is None:
    from lmdm_jax.data.audio import save_npy
    return save_npy(os.path.splitext(path)[0] + ".npy", out)
  from lmdm_jax.data.audio import save_audio
  save_audio(path, out, system.codec.sample_rate)
  return path


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", default="tiny",
                  help="a registered config (tiny, demo, saos, ...[:arg]) or your own path/to/config.py "
                       "(default: tiny)")
  ap.add_argument("--data", default="synthetic",
                  help="latent dataset folder (lmdm_jax.data.dataset), or 'synthetic' (default)")
  ap.add_argument("--workdir", required=True,
                  help="run folder: config.json, checkpoints/, metrics.jsonl; rerunning resumes")
  ap.add_argument("--steps", type=int, help="total steps (default: the config's train.steps)")
  ap.add_argument("--batch-size", type=int,
                  help="global batch size (default: the config's train.batch_size)")
  ap.add_argument("--ckpt-every", type=int,
                  help="steps between checkpoints (default: the config's train.ckpt_every)")
  ap.add_argument("--keep", type=int, help="checkpoints kept (default: the config's train.keep)")
  ap.add_argument("--log-every", type=int,
                  help="steps between metrics lines (default: the config's train.log_every)")
  ap.add_argument("--eval-every", type=int,
                  help="steps between held-out losses (default: the config's train.eval_every)")
  ap.add_argument("--fsdp", type=int,
                  help="devices per FSDP group; data-parallel over the rest (default: the config's, 1)")
  ap.add_argument("--lr", type=float, help="peak learning rate (default: the config's train.stage1.lr)")
  ap.add_argument("--seed", type=int, help="init, data and noise seed (default: the config's seed)")
  ap.add_argument("--sample-every", type=int,
                  help="write an audio sample every N steps, 0: never (default: the config's, 0)")
  ap.add_argument("--sample-seconds", type=float,
                  help="length of those samples in seconds (default: the config's, 10)")
  ap.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
  distributed.add_arguments(ap)
  args = ap.parse_args(argv)
  compile_cache.enable(log=lambda m: print(f"[train] {m}"))

  distributed.initialize_from_args(args, ap)  # before anything touches a device
  main_process = distributed.is_main()  # writes config.json and metrics.jsonl
  conf = load_cli_config(args.config)
  cfg = DiTConfig.from_config(conf.model)
  if latest_step(os.path.join(args.workdir, "checkpoints")) is not None:
    cfg = run_layout(cfg, args.workdir)  # a resumed run keeps the rotary layout it trained in
  tr = _train_defaults(conf)
  for k in ("steps", "batch_size", "ckpt_every", "keep", "log_every", "eval_every", "fsdp",
            "sample_every", "sample_seconds"):
    if getattr(args, k) is not None:
      tr[k] = getattr(args, k)
  if args.lr is not None:
    tr["stage1"]["lr"] = args.lr
  seed = conf.get("seed", 0) if args.seed is None else args.seed
  tc = Stage1Config.from_config(tr["stage1"])
  os.makedirs(args.workdir, exist_ok=True)

  mesh = sharding.make_mesh(fsdp=tr["fsdp"])
  sharding.check_batch(tr["batch_size"], mesh)
  model = DiT(cfg, rngs=nnx.Rngs(seed))
  trainer = Stage1(model, tc)
  source = make_source(args.data, trainer.frames, cfg, seed)
  held = make_source(args.data, trainer.frames, cfg, seed, holdout=True)
  from lmdm_jax import text as text_lib
  text = text_lib.from_config(conf) if cfg.cond_token_dim else None
  batches, held_batches = Batcher(source, cfg, text), Batcher(held, cfg, text)

  state = trainer.init_state(model)
  del model
  state, shard = sharding.place(state, mesh)
  ckpt = Checkpointer(os.path.join(args.workdir, "checkpoints"), keep=tr["keep"])
  start = 0
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(abstract_like(state, shard))
    start = int(state["step"])
    print(f"[train] resumed from step {start} ({ckpt.directory})")
  metrics_path = os.path.join(args.workdir, "metrics.jsonl")
  if main_process:
    truncate_metrics(metrics_path, start)
    tmp = os.path.join(args.workdir, "config.json.tmp")
    with open(tmp, "w") as f:
      json.dump({"config": args.config, "model": dict(conf.model, positions=cfg.positions),
                 "train": tr, "seed": seed,
                 "data": args.data}, f, indent=1, default=str)
    os.replace(tmp, os.path.join(args.workdir, "config.json"))

  bsh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  step_fn = jax.jit(trainer.train_step, donate_argnums=(0,), in_shardings=(shard, bsh, rep),
                    out_shardings=(shard, rep))
  eval_fn = jax.jit(trainer.eval_loss, in_shardings=(shard, bsh, rep), out_shardings=rep)
  base_key = jax.random.key(seed)
  rows = sharding.local_rows(tr["batch_size"], mesh)  # this process's rows of each batch

  def batch_at(batcher, step):
    return sharding.global_batch(batcher(step, tr["batch_size"], rows), tr["batch_size"], mesh)

  def key_at(key):
    return sharding.put(key, rep)

  steps = tr["steps"]
  bar = tqdm(range(start, steps), initial=start, total=steps,
             disable=args.no_progress or not main_process, dynamic_ncols=True, desc="train")
  t_last, n_last = time.perf_counter(), start
  with open(metrics_path if main_process else os.devnull, "a") as mf:
    for step in bar:
      batch = batch_at(batches, step)
      state, m = step_fn(state, batch, key_at(jax.random.fold_in(base_key, step)))
      done = step + 1
      if done % tr["log_every"] == 0 or done == steps:
        m = {k: float(v) for k, v in m.items()}
        now = time.perf_counter()
        rate = (done - n_last) / max(now - t_last, 1e-9)
        t_last, n_last = now, done
        rec = {"step": done, **m, "steps_per_s": rate}
        if tr["eval_every"] and (done % tr["eval_every"] == 0 or done == steps):
          ev = [float(eval_fn(state, batch_at(held_batches, 10_000_000 + i),
                              key_at(jax.random.key(i)))) for i in range(tr["eval_batches"])]
          rec["heldout_loss"] = float(np.mean(ev))
        mf.write(json.dumps(rec) + "\n")
        mf.flush()
        bar.set_postfix(loss=f"{m['loss']:.4f}", it_s=f"{rate:.2f}")
      if done % tr["ckpt_every"] == 0 or done == steps:
        ckpt.save(done, state, meta={"step": done, "config": args.config})
      if tr["sample_every"] and done % tr["sample_every"] == 0 and jax.process_count() == 1:
        caption = held.batch(20_000_000 + done, 1)["captions"][0]
        out = write_sample(trainer.graphdef, state, conf, cfg, caption,
                           os.path.join(args.workdir, "samples", f"step_{done:07d}.wav"),
                           tr["sample_seconds"], seed=done)
        bar.write(f"[train] step {done}: sample {out} ({caption!r})")
  ckpt.close()
  print(f"[train] finished at step {steps}; checkpoints in {ckpt.directory}")


if __name__ == "__main__":
  main()
