"""JAX (lmdm_jax) vs PyTorch on the CPU: the same weights and inputs, a markdown table.

(i)  one DiT forward over the LMDM window (240 frames + the global token = 241 tokens at saos
     scale; (window_chunks + 1) * chunk + 1 for ``tiny``), block-causal mask, batch 1 and 2:
     JAX ``jax.jit`` vs PyTorch eager (and ``torch.compile`` when it works on this CPU), with one
     thread and with all threads.
(ii) one streamed block, 8 steps, classifier-free guidance (batch 1): our cached block-causal
     sampler (``lmdm_jax.sampling.Stream``, regime ``block_causal``), our naive regime (the same
     window recompute in JAX), and the PyTorch way a stable-audio-tools user does block-wise
     outpainting today: the full window recomputed at every step, the batch doubled for CFG.

The PyTorch model is ``tests.torch_reference.LMDMDiffusionTransformer``: stable-audio-tools 0.0.20
modules plus the LMDM input_add / postpend / router mask (re-implemented from the spec; its
parity with our DiT is tested in tests/test_dit_parity.py). Its random weights are converted to
ours with ``lmdm_jax.convert.dit``; the max abs difference of the two forwards is reported.

Times are medians over ``--reps`` (at least 20 for ``tiny``) after a warm-up. GFLOP/s counts 2 * (matmul params) per token
plus attention (4 * queries * keys * dim per layer, and the same for cross-attention), from the
shapes, for the work each implementation really does (the PyTorch forward also re-projects the
65 conditioning tokens; our stream does that once per prompt).

  python3 bench/torch_baseline.py --quick             # tiny only (CI smoke)
  nice -n 10 python3 bench/torch_baseline.py --configs saos --reps 3
One thread: PyTorch ``torch.set_num_threads(1)``; JAX in its own process with
XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1".
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
CROSS_LEN = 65  # 64 T5 tokens + the seconds token
STEPS = 8
CFG_SCALE = 3.0


# ---------------------------------------------------------------------------------- FLOPs


def per_token_params(cfg) -> int:
  """Matmul parameters each token goes through (blocks + io projections)."""
  d, inner = cfg.embed_dim, cfg.embed_dim * cfg.ff_mult
  block = 4 * d * d + 2 * d * d + 3 * d * inner  # qkv+out, cross q+out, ff in (2x) + out
  return cfg.depth * block + 2 * cfg.io_channels * d + cfg.input_add_dim * d + \
      2 * cfg.io_channels * cfg.io_channels


def cross_flops(cfg) -> float:
  """Projecting the conditioning tokens: to_cond_embed + every layer's to_kv."""
  cd = cfg.cross_dim
  return 2 * CROSS_LEN * (cfg.cond_token_dim * cd + cd * cd + cfg.depth * 2 * cd * cd)


def pass_flops(cfg, nq: int, nk: int) -> float:
  d, L = cfg.embed_dim, cfg.depth
  return 2 * nq * per_token_params(cfg) + L * 4 * nq * nk * d + L * 4 * nq * CROSS_LEN * d


def window_tokens(cfg) -> int:
  return (cfg.window_chunks + 1) * cfg.chunk + 1


def forward_flops(cfg, batch: int) -> float:
  n = window_tokens(cfg)
  return batch * (pass_flops(cfg, n, n) + cross_flops(cfg))


def naive_block_flops(cfg, with_cross: bool) -> float:
  n = window_tokens(cfg)
  per = pass_flops(cfg, n, n) + (cross_flops(cfg) if with_cross else 0.0)
  return 2 * STEPS * per  # CFG: batch 2


def cached_block_flops(cfg) -> float:
  cs, K = cfg.chunk, cfg.context_chunks
  fused = pass_flops(cfg, 2 * cs + 1, K * cs + 2 * cs + 1)
  step = pass_flops(cfg, cs + 1, K * cs + cs + 1)
  return 2 * (fused + (STEPS - 1) * step)


# --------------------------------------------------------------------------------- worker


def _median_ms(fn, reps: int, warmup: int = 1) -> float:
  for _ in range(warmup):
    fn()
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(ts)


def worker(args) -> dict:
  """Runs in its own process (thread settings must precede the imports)."""
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from flax import nnx

  from lmdm_jax import layouts
  from lmdm_jax.config import DiTConfig, load_cli_config
  from lmdm_jax.convert import dit as conv
  from lmdm_jax.nn import attention as A
  from tests import torch_reference

  threads = args.threads
  if threads == 1:
    torch.set_num_threads(1)
  else:
    torch.set_num_threads(os.cpu_count())
  ref = torch_reference.dit_modules()
  cfg = DiTConfig.from_config(load_cli_config(args.config).model)
  torch.manual_seed(0)
  kw = dict(io_channels=cfg.io_channels, embed_dim=cfg.embed_dim, depth=cfg.depth,
            num_heads=cfg.num_heads, cond_token_dim=cfg.cond_token_dim,
            project_cond_tokens=cfg.project_cond_tokens, global_cond_dim=cfg.global_cond_dim,
            timestep_features_dim=cfg.timestep_features_dim, attn_kwargs={"qk_norm": cfg.qk_norm})
  tm = ref.LMDMDiffusionTransformer(diffusion_objective="rectified_flow",
                                    input_add_dim=cfg.input_add_dim, postpend=True, **kw).eval()
  with torch.no_grad():  # small random weights everywhere (zero-initialized layers too)
    for name, p in tm.named_parameters():
      if p.ndim >= 2:
        p.copy_(torch.randn_like(p) * (0.5 / np.sqrt(np.prod(p.shape[1:]))))
      elif not name.endswith(("gamma", "norm.weight")):
        p.copy_(0.05 * torch.randn_like(p))
  model_json = {"model_type": "diffusion_cond", "model": {"diffusion": {"type": "dit", "config": dict(
      kw, postpend=True, input_add_dims=[["inpaint_mask", 1], ["inpaint_masked_input", cfg.io_channels]]
      + ([["extra", cfg.extra_dim]] if cfg.extra_dim else []))}},
      "training": {"inpainting": {"mask_kwargs": {
          "fixed_mask_size": cfg.window_chunks * cfg.chunk, "block_causal_chunk_size": cfg.chunk,
          "block_causal_window_chunks": cfg.context_chunks + 1}}}}
  converted = conv.convert_state_dict(
      model_json, {f"model.model.{k}": v for k, v in tm.state_dict().items()})
  model = converted.model
  assert converted.config.chunk == cfg.chunk and converted.config.window_chunks == cfg.window_chunks
  cfg = converted.config
  graphdef, state = nnx.split(model)

  cs, W = cfg.chunk, cfg.window_chunks
  T = (W + 1) * cs
  win = layouts.window_layout(W, cs)
  mask_j = A.streaming_mask(win.all, win.all, cfg.context_chunks)
  mask_t = torch.from_numpy(np.asarray(mask_j))
  rows = []

  @jax.jit
  def jax_forward(state, x, t, c, g, a, m, mask):
    return nnx.merge(graphdef, state)(x, t, c, g, input_add=a, context_mask=m, mask=mask)

  def make_inputs(b):
    gen = torch.Generator().manual_seed(b)
    x = torch.randn(b, cfg.io_channels, T, generator=gen)
    t = torch.full((b,), 0.7)
    c = torch.randn(b, CROSS_LEN, cfg.cond_token_dim, generator=gen)
    g = torch.randn(b, cfg.global_cond_dim, generator=gen)
    m = torch.zeros(b, 1, T)
    m[:, :, :W * cs] = 1
    ctx = torch.randn(b, cfg.io_channels, T, generator=gen) * m
    a = torch.cat([m, ctx] + ([torch.zeros(b, cfg.extra_dim, T)] if cfg.extra_dim else []), 1)
    return x, t, c, g, a, m

  if args.config == "tiny":  # milliseconds: more repetitions for a stable median
    args.reps = max(args.reps, 20)
  for b in args.batches:
    x, t, c, g, a, m = make_inputs(b)
    jargs = (state, jnp.asarray(x.numpy().transpose(0, 2, 1)), jnp.asarray(t.numpy()),
             jnp.asarray(c.numpy()), jnp.asarray(g.numpy()),
             jnp.asarray(a.numpy().transpose(0, 2, 1)), jnp.asarray(m[:, 0].numpy()), mask_j)
    out_j = np.asarray(jax_forward(*jargs))
    ms_j = _median_ms(lambda: jax_forward(*jargs).block_until_ready(), args.reps)

    def torch_fwd(f=tm.lmdm_forward):
      with torch.inference_mode():
        return f(x, t, c, g, a, 1 - m, mask_t)

    out_t = torch_fwd().numpy().transpose(0, 2, 1)
    ms_t = _median_ms(torch_fwd, args.reps)
    ms_c, compile_note = None, ""
    if args.torch_compile and b in args.compile_batches:
      try:
        compiled = torch.compile(tm.lmdm_forward)
        t0 = time.perf_counter()
        torch_fwd(compiled)
        compile_note = f"compile {time.perf_counter() - t0:.0f} s"
        ms_c = _median_ms(lambda: torch_fwd(compiled), args.reps)
      except Exception as e:  # noqa: BLE001 - report why torch.compile is unavailable
        compile_note = f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    rows.append(dict(kind="forward", config=args.config, batch=b, threads=threads, jax_ms=ms_j,
                     torch_ms=ms_t, compile_ms=ms_c, note=compile_note,
                     flops=forward_flops(cfg, b), maxdiff=float(np.max(np.abs(out_j - out_t)))))

  if args.blocks:
    rows += stream_blocks(args, cfg, model, tm, mask_t, make_inputs, threads)
  return {"rows": rows}


def stream_blocks(args, cfg, model, tm, mask_t, make_inputs, threads):
  """(ii): one block, 8 steps, CFG, batch 1: our streams vs the PyTorch window recompute."""
  import jax.numpy as jnp
  import numpy as np
  import torch

  from lmdm_jax import sampling as S
  rows = []
  x, t, c, g, a, m = make_inputs(1)
  sp = S.SamplerParams.make(steps=STEPS, cfg_scale=CFG_SCALE, plus_plus=False, pingpong=True)
  for regime in ("block_causal", "naive"):
    stream = S.Stream(model, batch=1, regime=regime, cfg_guidance=True, cross_len=CROSS_LEN,
                      sampler=sp)
    stream.set_prompt(jnp.asarray(c.numpy()), jnp.asarray(g.numpy()))
    for _ in range(cfg.context_chunks + 1):  # fill the cache: steady state
      stream.next_block().block_until_ready()
    ms = _median_ms(lambda: stream.next_block().block_until_ready(), args.reps, warmup=0)
    flops = cached_block_flops(cfg) if regime == "block_causal" else naive_block_flops(cfg, False)
    rows.append(dict(kind="block", impl=f"JAX Stream `{regime}`", config=args.config,
                     threads=threads, ms=ms, flops=flops))

  # PyTorch: full window recomputed every step, batch doubled for CFG (v_u + w (v_c - v_u)),
  # pingpong update, the reference's sigmoid schedule; context re-noised each step (§3.1).
  sched = np.asarray(S.schedule(STEPS))[:STEPS + 1]
  cs = cfg.chunk
  ctx = a[:, 1:1 + cfg.io_channels]
  mask_ctx = m
  r = 1 - m
  c2 = torch.cat([c, torch.zeros_like(c)])
  g2, a2, r2, t_ones = torch.cat([g, g]), torch.cat([a, a]), torch.cat([r, r]), torch.ones(2)
  gen = torch.Generator().manual_seed(0)

  def torch_block():
    with torch.inference_mode():
      xx = torch.randn(x.shape, generator=gen)
      for i in range(STEPS):
        ti, tn = float(sched[i]), float(sched[i + 1])
        noise = torch.randn(x.shape, generator=gen)
        xx = xx * (1 - mask_ctx) + (ctx * (1 - ti) + noise * ti) * mask_ctx
        v = tm.lmdm_forward(torch.cat([xx, xx]), t_ones * ti, c2, g2, a2, r2, mask_t)
        v_c, v_u = v[:1], v[1:]
        v = v_u + CFG_SCALE * (v_c - v_u)
        d = xx - ti * v
        xx = (1 - tn) * d + tn * torch.randn(x.shape, generator=gen)
      return xx[..., -cs:]

  ms = _median_ms(torch_block, args.reps)
  rows.append(dict(kind="block", impl="PyTorch window recompute (eager)", config=args.config,
                   threads=threads, ms=ms, flops=naive_block_flops(cfg, True)))
  return rows


# ------------------------------------------------------------------------------------ main


def run_worker(config: str, threads: int, args) -> dict:
  env = dict(os.environ)
  if threads == 1:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + SINGLE_THREAD_XLA).strip()
    env["OMP_NUM_THREADS"] = "1"
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--configs", config,
         "--threads", str(threads), "--reps", str(args.reps),
         "--batches", ",".join(map(str, args.batches)),
         "--compile-batches", ",".join(map(str, args.compile_batches))]
  if not args.torch_compile:
    cmd.append("--no-torch-compile")
  blocks = threads != 1 or args.block_single_thread or config == "tiny"
  if blocks:
    cmd.append("--blocks")
  print(f"# running {config}, {threads} thread(s) ...", file=sys.stderr, flush=True)
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
  if out.returncode != 0:
    raise SystemExit(f"worker {config}/{threads} failed:\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def fmt_ms(v):
  return "n/a" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def gflops(flops, ms):
  return "n/a" if ms is None else f"{flops / (ms * 1e-3) / 1e9:.1f}"


def table(rows) -> str:
  out = ["### (i) one DiT forward over the window (block-causal mask)", "",
         "| config | batch | threads | JAX jit ms | torch eager ms | torch.compile ms | eager/JAX |"
         " JAX GFLOP/s | torch GFLOP/s | max abs diff | note |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["kind"] != "forward":
      continue
    best_t = min(v for v in (r["torch_ms"], r["compile_ms"]) if v is not None)
    out.append(f"| {r['config']} | {r['batch']} | {r['threads']} | {fmt_ms(r['jax_ms'])} | "
               f"{fmt_ms(r['torch_ms'])} | {fmt_ms(r['compile_ms'])} | "
               f"{r['torch_ms'] / r['jax_ms']:.2f} | {gflops(r['flops'], r['jax_ms'])} | "
               f"{gflops(r['flops'], best_t)} | {r['maxdiff']:.1e} | {r['note']} |")
  out += ["", f"### (ii) one streamed block: {STEPS} steps, CFG (batch 1 -> 2)", "",
          "| config | threads | implementation | ms / block | vs PyTorch | GFLOP / block |"
          " GFLOP/s |", "|---|---|---|---|---|---|---|"]
  groups = {}
  for r in rows:
    if r["kind"] == "block":
      groups.setdefault((r["config"], r["threads"]), []).append(r)
  for (config, threads), rs in groups.items():
    base = next(r["ms"] for r in rs if r["impl"].startswith("PyTorch"))
    for r in rs:
      out.append(f"| {config} | {threads} | {r['impl']} | {fmt_ms(r['ms'])} | "
                 f"{base / r['ms']:.2f}x | {r['flops'] / 1e9:.2f} | {gflops(r['flops'], r['ms'])} |")
  return "\n".join(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", default="tiny,saos", help="comma-separated config names")
  p.add_argument("--quick", action="store_true", help="tiny only (CI smoke)")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--batches", default="1,2")
  p.add_argument("--threads", default="1,all", help="'1', 'all' or '1,all'")
  p.add_argument("--no-torch-compile", dest="torch_compile", action="store_false",
                 help="skip torch.compile (its CPU compile takes minutes; --quick skips it)")
  p.add_argument("--compile-batches", default="1",
                 help="batch sizes to also time with torch.compile (default 1)")
  p.add_argument("--block-single-thread", action="store_true",
                 help="also time (ii) with one thread at saos scale (slow)")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--blocks", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.batches = [int(b) for b in str(args.batches).split(",")]
  args.compile_batches = [int(b) for b in str(args.compile_batches).split(",")]
  if args.quick:
    args.torch_compile = False
  if args.worker:
    args.config = args.configs
    args.threads = int(args.threads)
    print(json.dumps(worker(args)))
    return
  configs = ["tiny"] if args.quick else args.configs.split(",")
  thread_set = [1 if s == "1" else os.cpu_count() for s in args.threads.split(",")]
  rows = []
  for config in configs:
    for th in thread_set:
      rows += run_worker(config, th, args)["rows"]
  print(f"CPU: {os.cpu_count()} cores; medians of {args.reps} after warm-up; fp32.\n")
  print(table(rows))


if __name__ == "__main__":
  main()
