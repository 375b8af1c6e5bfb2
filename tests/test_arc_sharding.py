"""ARC-Forcing under the stage-1 mesh: 8 simulated CPU devices (data 4 x fsdp 2) give the same G
and D steps as one device (a mesh of one), through the CLI's own step functions
(``arc.make_step_fns``). Runs in a subprocess (the device count is fixed when JAX starts); about
a minute of CPU time, nearly all of it compiling the four step programs."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, %r)
    import jax, numpy as np
    from flax import nnx
    from lmdm_jax.config import DiTConfig, load_config
    from lmdm_jax.nn import adapters as AD
    from lmdm_jax.nn.discriminator import HeadConfig
    from lmdm_jax.nn.dit import DiT
    from lmdm_jax.training import sharding
    from lmdm_jax.training.arc_forcing import ARCConfig, ARCForcing, jit_step, make_head
    from lmdm_jax.training.data import Batcher, SyntheticLatents
    from lmdm_jax.training import arc_run as arc
    assert len(jax.devices()) == 8
    OPTS = {"xla_backend_optimization_level": 0}  # the same program, faster to compile on CPU

    conf = load_config("arc_tiny")
    cfg = DiTConfig.from_config(conf.model)
    rng = np.random.default_rng(0)

    def build():
      model = AD.add_adapters(DiT(cfg, rngs=nnx.Rngs(0)),
                              AD.AdapterConfig.from_config(conf.adapter))
      return model, make_head(cfg, HeadConfig.from_config(conf.head))

    def fill(path, v):  # random weights of the usual scales; B != 0 (a partly trained adapter)
      name, z = str(path[-1]), rng.standard_normal(v.shape)
      if name in ("scale", "g"):
        z = 1 + 0.05 * z
      elif name in ("bias", "lora_b"):
        z = 0.05 * z
      elif name != "timestep_features":
        z = z / np.sqrt(np.prod(v.shape[:-1]))
      return z.astype(v.dtype)

    def split(m):
      return nnx.split(m, (nnx.Param, AD.AdapterParam), ...)

    # weights from numpy, buffers (rotary frequencies, ...) from their initializers alone
    # (compiling the whole init program would add several seconds)
    abstract = [split(m) for m in nnx.eval_shape(build)]
    rest = jax.jit(lambda: [split(m)[2] for m in build()]).lower().compile(compiler_options=OPTS)()
    model, head = (nnx.merge(gd, nnx.from_flat_state({p: v.replace(fill(p, v))
                                                      for p, v in nnx.to_flat_state(w)}), r)
                   for (gd, w, _), r in zip(abstract, rest))
    trainer = ARCForcing(model, ARCConfig.from_config(dict(conf.arc, rollout_blocks=2, steps=4,
                                                           max_k=3)), head)
    state, frozen = trainer.init(model, head)
    host = lambda t: jax.tree.map(np.asarray, t)
    state0, frozen0 = host(state), host(frozen)
    batches = Batcher(SyntheticLatents(trainer.frames, cfg.io_channels, seed=0), cfg)
    B = 8
    b0, b1 = batches(0, B), batches(1, B)
    k0, k1 = (jax.random.fold_in(jax.random.key(0), s) for s in (0, 1))

    def has_fsdp(x):
      return "fsdp" in jax.tree.leaves(tuple(x.sharding.spec))

    def run(mesh):
      g_fn, d_fn = arc.make_step_fns(trainer, OPTS, mesh)
      st, _ = sharding.place(state0, mesh)
      fr, _ = sharding.place(frozen0, mesh)
      sg, mg = g_fn(st, fr, b0, k0)
      sg_h = host(sg)
      sd, md = d_fn(sg, fr, b1, k1)
      groups = dict(adapter=sd["adapter"], head=sd["head"], opt_g=sd["opt_g"], opt_d=sd["opt_d"],
                    base=fr["params"])
      info = {}
      for name, tree in groups.items():
        xs = [x for x in jax.tree.leaves(tree) if has_fsdp(x)]
        info[name] = [len(xs), len(jax.tree.leaves(tree)),
                      all(x.addressable_shards[0].data.size * 2 == x.size for x in xs)]
      _, (_, _, bsh, _) = jit_step(trainer, "g", state0, frozen0, mesh)
      info["batch_split"] = bsh.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
      info["mesh"] = dict(mesh.shape)
      return dict(mg={k: float(v) for k, v in mg.items()}, md={k: float(v) for k, v in md.items()},
                  sg=sg_h, sd=host(sd), frozen=host(fr), info=info)

    one = run(sharding.make_mesh(devices=jax.devices()[:1]))
    eight = run(sharding.make_mesh(fsdp=2))
    L = jax.tree.leaves

    def rel(a, b):
      return abs(a - b) / max(abs(a), 1e-12)

    def max_diff(t1, t2, scale_tree):
      d = max(float(np.abs(a - b).max()) for a, b in zip(L(t1), L(t2)))
      return d / max(float(np.abs(s).max()) for s in L(scale_tree))

    def upd_diff(new1, new2, old, mu, frac=1e-3):
      # Adam's first step is ~lr sign(g): rounding-level differences of a near-zero gradient flip
      # a whole update, so updates are compared where |g| (|mu| = (1 - b1)|g|) is not tiny.
      thr = frac * max(float(np.abs(m).max()) for m in L(mu))
      out = 0.0
      for a, b, c, m in zip(L(new1), L(new2), L(old), L(mu)):
        sel = np.abs(m) > thr
        if sel.any():
          out = max(out, float(np.abs((a - c) - (b - c))[sel].max()))
      return out

    mu = lambda s, k: s[k][-1][0].mu  # chain(clip, adamw): adamw's ScaleByAdamState
    res = dict(
        info1=one["info"], info8=eight["info"],
        loss_g=one["mg"]["loss_g"], loss_d=one["md"]["loss_d"], loss_c=one["md"]["loss_c"],
        rel_loss_g=rel(one["mg"]["loss_g"], eight["mg"]["loss_g"]),
        rel_loss_d=rel(one["md"]["loss_d"], eight["md"]["loss_d"]),
        rel_loss_c=rel(one["md"]["loss_c"], eight["md"]["loss_c"]),
        rel_grad_norm_g=rel(one["mg"]["grad_norm"], eight["mg"]["grad_norm"]),
        rel_grad_norm_d=rel(one["md"]["grad_norm"], eight["md"]["grad_norm"]),
        grad_g=max_diff(mu(one["sg"], "opt_g"), mu(eight["sg"], "opt_g"), mu(one["sg"], "opt_g")),
        grad_d=max_diff(mu(one["sd"], "opt_d"), mu(eight["sd"], "opt_d"), mu(one["sd"], "opt_d")),
        adapter=max_diff(one["sg"]["adapter"], eight["sg"]["adapter"], one["sg"]["adapter"]),
        head=max_diff(one["sd"]["head"], eight["sd"]["head"], one["sd"]["head"]),
        adapter_moved=max_diff(one["sg"]["adapter"], state0["adapter"], state0["adapter"]),
        head_moved=max_diff(one["sd"]["head"], state0["head"], state0["head"]),
        upd_adapter=upd_diff(one["sg"]["adapter"], eight["sg"]["adapter"], state0["adapter"],
                             mu(one["sg"], "opt_g")),
        upd_head=upd_diff(one["sd"]["head"], eight["sd"]["head"], state0["head"],
                          mu(one["sd"], "opt_d")),
        lr_g=trainer.ac.lr_g, lr_d=trainer.ac.lr_d,
        base_identical=all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(
            L(frozen0), L(one["frozen"]), L(eight["frozen"]))),
        # G moves only the adapter, D only the head (bit-identical otherwise), on both meshes
        g_keeps_head=all(np.array_equal(a, b) for r in (one, eight)
                         for a, b in zip(L(r["sg"]["head"]), L(state0["head"]))),
        d_keeps_adapter=all(np.array_equal(a, b) for r in (one, eight)
                            for a, b in zip(L(r["sd"]["adapter"]), L(r["sg"]["adapter"]))))
    print("RESULT " + json.dumps(res))
""")


def test_sharded_arc_steps_equal_single_device_steps():
  t0 = time.perf_counter()
  out = subprocess.run([sys.executable, "-c", SCRIPT % ROOT], capture_output=True, text=True,
                       timeout=1800)  # minutes on a loaded 2-core machine
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads([l for l in out.stdout.splitlines() if l.startswith("RESULT ")][0][7:])
  print(f"ARC, 8-device mesh (data 4 x fsdp 2) vs 1 device ({time.perf_counter() - t0:.0f} s): "
        f"loss_g {r['loss_g']:.6f} (rel diff {r['rel_loss_g']:.1e}), loss_d {r['loss_d']:.6f} "
        f"({r['rel_loss_d']:.1e}), loss_c {r['loss_c']:.6f} ({r['rel_loss_c']:.1e}); "
        f"grad (Adam mu) max diff / max: G {r['grad_g']:.1e}, D {r['grad_d']:.1e}; updated "
        f"params max diff / max |param|: adapter {r['adapter']:.1e}, head {r['head']:.1e} "
        f"(moved by {r['adapter_moved']:.1e}, {r['head_moved']:.1e}); update diff where "
        f"|g| > 1e-3 max|g|: adapter {r['upd_adapter'] / r['lr_g']:.1e} lr, head "
        f"{r['upd_head'] / r['lr_d']:.1e} lr (lr {r['lr_g']:.0e}); fsdp-sharded leaves "
        f"{r['info8']}")
  # the layout: stage 1's rules on the (data, fsdp) mesh
  assert r["info8"]["mesh"] == {"data": 4, "fsdp": 2} and r["info1"]["mesh"] == {"data": 1,
                                                                                "fsdp": 1}
  assert r["info8"]["batch_split"]  # the batch over both axes
  for name in ("adapter", "head", "opt_g", "opt_d", "base"):
    n_fsdp, n_leaves, halved = r["info8"][name]
    assert n_fsdp > 0 and halved, (name, r["info8"][name])
    assert r["info1"][name][0] == 0  # one device: nothing split
  assert r["info8"]["adapter"][0] == r["info8"]["adapter"][1]  # every LoRA factor is split
  # the same steps
  for k in ("rel_loss_g", "rel_loss_d", "rel_loss_c", "rel_grad_norm_g", "rel_grad_norm_d"):
    assert r[k] < 1e-5, (k, r[k])
  assert r["loss_c"] > 0  # the contrastive term (the batch-rolled prompts) is exercised
  assert r["grad_g"] < 1e-4 and r["grad_d"] < 1e-4
  assert r["adapter"] < 1e-4 and r["head"] < 1e-4
  assert r["adapter_moved"] > 0 and r["head_moved"] > 0
  # Adam's first step moves each element by about lr sign(g): where |g| is not tiny no sign
  # differs (a flip would be 2 lr); what remains is float32 rounding of param + update
  assert r["upd_adapter"] < 0.25 * r["lr_g"] and r["upd_head"] < 0.25 * r["lr_d"]
  assert r["base_identical"] and r["g_keeps_head"] and r["d_keeps_adapter"]
