"""Fine-tuning from a pretrained model (``train.init_from``, ``train.freeze``;
``lmdm_jax.training.init_from``): matching parameters load, new inputs start at zero so that the
model's output at step 0 is the source's, a report lists what happened, frozen parameters stay
bit-identical, a resumed run ignores the init. The slow test goes from a tiny Stable-Audio-Open-like
PyTorch checkpoint through the converter and train.py to ARC-Forcing on the fine-tuned run."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lmdm_jax import bundle
from lmdm_jax.config import DiTConfig, load_config
from lmdm_jax.nn.dit import DiT
from lmdm_jax.sources import load_dit
from lmdm_jax.training import init_from
from lmdm_jax.training.init_from import InitError, init_model

pytestmark = pytest.mark.slow  # fine-tuning runs (the full suite runs them)

TINY = DiTConfig.from_config(load_config("tiny").model)


def _inputs(cfg, seed=0, b=2, n=12):
  r = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)  # noqa: E731
  ctx_mask = jnp.asarray(np.arange(n) < n // 2, jnp.float32)[None].repeat(b, 0)
  x0 = f(b, n, cfg.io_channels)
  input_add = jnp.concatenate([ctx_mask[..., None], x0 * ctx_mask[..., None]], -1)
  return dict(x=f(b, n, cfg.io_channels), t=jnp.asarray(r.uniform(size=b), jnp.float32),
              cond_tokens=f(b, 5, cfg.cond_token_dim) if cfg.cond_token_dim else None,
              global_cond=f(b, cfg.global_cond_dim) if cfg.global_cond_dim else None,
              input_add=input_add, context_mask=ctx_mask)


def _random(cfg, seed=0, scale=0.05):
  """A DiT whose parameters are init + scale * N(0, 1) (numpy noise: few compiles on CPU)."""
  model = DiT(cfg, rngs=nnx.Rngs(seed))
  r = np.random.default_rng(seed)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.tree.map(lambda x: x + scale * r.standard_normal(x.shape, np.float32), params)
  return nnx.merge(graphdef, params, rest)


@nnx.jit
def _forward(model, inp):
  return model(**inp)


def _with_extra(inp, extra: int):
  """The same inputs for a model with ``extra`` more input_add channels, absent (zeros)."""
  ia = inp["input_add"]
  return dict(inp, input_add=jnp.concatenate([ia, jnp.zeros(ia.shape[:2] + (extra,))], -1))


def _flat(model, kind=nnx.Param):
  return {init_from.param_name(p): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(model, kind))}


def test_bundle_init_adds_channels_and_a_block_without_changing_the_output(tmp_path):
  src = _random(TINY, seed=1)
  path = bundle.save_bundle(src, str(tmp_path / "src.npz"), {"config": "tiny"}, dtype=np.float32)
  extra = 1 + TINY.io_channels  # an accompaniment group, as Batcher lays it out
  cfg = dataclasses.replace(TINY, input_add_dim=TINY.input_add_dim + extra, depth=TINY.depth + 1)
  model = DiT(cfg, rngs=nnx.Rngs(5))
  rep = init_model(model, path, load_dit)
  assert rep.kind == "bundle" and rep.dropped == []
  assert rep.widened == [{"name": "to_input_add_embed/kernel", "source_shape": [9, 128],
                          "shape": [9 + extra, 128]}]
  new = {n["name"]: n["init"] for n in rep.new}
  assert new and all(n.startswith("layers/2/") for n in new), new
  assert new["layers/2/ff_out/kernel"] == new["layers/2/self_attn/to_out/kernel"] == "zeros"
  assert new["layers/2/ff_in/kernel"] == "fresh"
  src_vars = _flat(src, ...)
  assert sorted(rep.loaded) == sorted(k for k in src_vars if k != "to_input_add_embed/kernel")
  got = _flat(model, ...)
  for k in rep.loaded:
    np.testing.assert_array_equal(got[k], src_vars[k], err_msg=k)
  w = got["to_input_add_embed/kernel"]
  np.testing.assert_array_equal(w[:9], src_vars["to_input_add_embed/kernel"])
  assert not w[9:].any()
  # step 0: with the new channels absent the model is the source, under the streaming inputs
  inp = _inputs(TINY)
  want = _forward(src, inp)
  out = _forward(model, _with_extra(inp, extra))
  d = float(jnp.abs(out - want).max())
  print(f"bundle -> +{extra} input_add channels, +1 block: step-0 max |dv| {d:.2e}")
  assert d < 1e-6 and float(jnp.abs(want).max()) > 0.1
  # EMA starts from the init
  from lmdm_jax.training.stage1 import Stage1, Stage1Config
  st = Stage1(model, Stage1Config(ema_decay=0.99)).init_state(model)
  for a, b in zip(jax.tree.leaves(st["ema"]), jax.tree.leaves(nnx.state(model, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _workdir(path, model, ema_shift):
  """A train.py work directory whose EMA weights are params + ema_shift."""
  from lmdm_jax.training.checkpoints import Checkpointer
  from lmdm_jax.training.stage1 import Stage1, Stage1Config
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"config": "tiny", "model": dataclasses.asdict(model.cfg), "train": {}, "seed": 0}, f)
  st = Stage1(model, Stage1Config(ema_decay=0.9)).init_state(model)
  st["ema"] = jax.tree.map(lambda x: x + ema_shift, st["ema"])
  ck = Checkpointer(os.path.join(path, "checkpoints"))
  ck.save(3, st)
  ck.close()


def test_workdir_init_uses_ema_and_errors_are_one_line(tmp_path):
  src = _random(TINY, seed=2)
  wd = str(tmp_path / "run")
  _workdir(wd, src, 0.5)
  model = DiT(TINY, rngs=nnx.Rngs(0))
  rep = init_model(model, wd, load_dit)
  assert rep.kind == "workdir" and rep.new == rep.widened == rep.dropped == []
  got, want = _flat(model), _flat(src)
  for k in want:
    np.testing.assert_allclose(got[k], want[k] + 0.5, rtol=0, atol=1e-6, err_msg=k)
  # a model without input_add: the source's projection is dropped
  base = dataclasses.replace(TINY, input_add_dim=0)
  rep = init_model(nnx.eval_shape(lambda: DiT(base, rngs=nnx.Rngs(0))), wd, load_dit)
  assert rep.dropped == [{"name": "to_input_add_embed/kernel", "shape": [9, 128]}]

  npz = bundle.save_bundle(src, str(tmp_path / "src.npz"), {"config": "tiny"}, dtype=np.float32)

  def err(cfg, source=npz):  # (a bundle: quicker to read than a work directory)
    with pytest.raises(InitError) as e:
      init_model(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0))), source, load_dit)
    msg = str(e.value)
    assert "\n" not in msg
    return msg
  msg = err(dataclasses.replace(TINY, ff_mult=2))
  assert "parameter layers/0/ff_in/bias has shape (1024,) in the source but (512,)" in msg, msg
  msg = err(dataclasses.replace(TINY, io_channels=4, input_add_dim=5))
  assert "shape" in msg and "input_add" in msg, msg
  # a qk-norm inside a loaded attention would change the output: refused, named
  nonorm = str(tmp_path / "nonorm.npz")
  bundle.save_bundle(_random(dataclasses.replace(TINY, qk_norm="none")), nonorm,
                     {"config": "tiny"}, dtype=np.float32)
  msg = err(TINY, nonorm)
  assert "parameter layers/0/" in msg and "_norm/" in msg and "not in the source" in msg, msg
  assert "no such file" in err(TINY, str(tmp_path / "missing"))
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not a zip")
  assert "bad.npz" in err(TINY, str(bad))


def test_freeze_zeroes_updates_of_matching_parameters():
  model = _random(TINY, seed=3)
  params = nnx.state(model, nnx.Param)
  names = init_from.frozen_names(params, r"layers/0/.*|timestep_features")
  assert "timestep_features" in names and all(
      n == "timestep_features" or n.startswith("layers/0/") for n in names)
  tx = init_from.with_freeze(optax.adamw(1e-2, weight_decay=0.1), r"layers/0/.*|timestep_features")
  grads = jax.tree.map(jnp.ones_like, params)
  upd, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
  moved = {k for k, v in _flat_state(upd).items() if np.abs(v).max() > 0}
  assert moved and moved.isdisjoint(names) and moved | set(names) == set(_flat_state(params))
  with pytest.raises(InitError, match="matches no parameter"):
    init_from.frozen_names(params, "layer/0/.*")
  with pytest.raises(InitError, match="not a regular expression"):
    init_from.frozen_names(params, "layers/(")


def test_train_cli_init_errors_are_one_line(tmp_path, capsys):
  from lmdm_jax.apps import train_cli
  wd = str(tmp_path / "run")
  for extra, want in ((["--init", str(tmp_path / "nothing")], "no such file or directory"),
                      (["--init", str(tmp_path)], "neither a train.py work directory")):
    assert train_cli.main(["--config", "tiny", "--workdir", wd, "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.init_from" in err[0] and want in err[0], err
  assert not os.path.exists(os.path.join(wd, "checkpoints"))


def _flat_state(state):
  return {init_from.param_name(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


# ------------------------------------------------------------------ from a PyTorch checkpoint


CONFIG_FILE = '''
import ml_collections
from lmdm_jax.config import load_config


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "finetune_test"
  c.model = ml_collections.ConfigDict({model!r})
  c.sampler = ml_collections.ConfigDict(dict(regime="block_causal", steps=4, cfg_scale=1.0,
                                             plus_plus=False, pingpong=True))
  c.conditioner = ml_collections.ConfigDict(dict(type="bytes", max_tokens=8))
  c.seed = 0
  c.train = ml_collections.ConfigDict(dict(
      batch_size=4, steps=20, ckpt_every=20, keep=2, log_every=1, eval_every=0, fsdp=1,
      init_from="", freeze={freeze!r},
      stage1=dict(chunks=4, lr=1e-2, clip_norm=1.0, ema_decay=0.9)))
  arc = load_config("arc_tiny")  # its ARC sections, scaled down further
  c.adapter = dict(arc.adapter, rank=4)
  c.head = arc.head
  c.arc = dict(arc.arc, rollout_blocks=2, steps=2, max_k=2, lr_g=1e-3, lr_d=1e-3)
  c.arc_train = dict(batch_size=2, steps=2, ckpt_every=2, keep=1, log_every=1)
  c.disc_backbone = None
  return c
'''


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_finetune_converted_base_model_then_arc(tmp_path, capsys):
  """A tiny SAO-like base checkpoint (stable-audio-tools' factory, random weights) -> convert ->
  train.py --init (input_add added, layer 0's self-attention frozen) 20 steps: the loss falls ->
  arc.py on the fine-tuned run. PyTorch and the checkpoint come from tests/test_system.py."""
  import torch

  from tests import test_system as ts
  from lmdm_jax.apps import arc_cli, train_cli
  from lmdm_jax.convert import dit as conv
  from lmdm_jax.convert.__main__ import main as convert_main
  from lmdm_jax.training import workdir as wd_lib
  t5 = ts.make_t5_dir(str(tmp_path / "t5"))
  base = ts.make_base_model(t5)
  torch.save({"state_dict": base.state_dict()}, tmp_path / "base.ckpt")
  conv_dir = str(tmp_path / "converted")
  assert convert_main([ts.write_json(tmp_path / "c.json", ts.base_config(t5)),
                       str(tmp_path / "base.ckpt"), conv_dir]) == 0
  src_cfg, src, _ = conv.load_converted(conv_dir)
  assert src_cfg.input_add_dim == 0 and src_cfg.global_token == "prepend"
  # the streaming model of the same size: input_add channels, global token last, 4-frame chunks
  cfg = dataclasses.replace(src_cfg, input_add_dim=1 + src_cfg.io_channels,
                            global_token="postpend", chunk=4, context_chunks=3, window_chunks=4,
                            positions="authors")
  freeze = r"layers/0/self_attn/.*"
  cfg_file = tmp_path / "finetune_test.py"
  cfg_file.write_text(CONFIG_FILE.format(model=dataclasses.asdict(cfg), freeze=freeze))

  # step 0: with input_add absent (zeros, no context) the model is the source
  model = DiT(cfg, rngs=nnx.Rngs(0))
  rep = init_model(model, conv_dir, load_dit)
  inp = {k: v for k, v in _inputs(src_cfg).items() if k not in ("input_add", "context_mask")}
  want = src(**inp)
  zeros = jnp.zeros(inp["x"].shape[:2] + (cfg.input_add_dim,))
  d = float(jnp.abs(model(**inp, input_add=zeros) - want).max())
  with capsys.disabled():
    print(f"\nconverted base -> streaming model: step-0 max |dv| {d:.2e} (|v| max "
          f"{float(jnp.abs(want).max()):.2f})")
  assert d < 1e-5 and float(jnp.abs(want).max()) > 0.1

  # train.py --init: report, loss, frozen parameters, EMA from the init
  run = str(tmp_path / "run")
  args = ["--config", str(cfg_file), "--data", "synthetic", "--workdir", run, "--no-progress"]
  train_cli.main(args + ["--init", conv_dir])
  log = capsys.readouterr().out
  assert f"init from {conv_dir} (converted" in log and "1 new" in log, log
  with open(os.path.join(run, "init_report.json")) as f:
    report = json.load(f)
  assert report["new"] == [{"name": "to_input_add_embed/kernel",
                            "shape": [cfg.input_add_dim, cfg.embed_dim], "init": "zeros"}]
  assert report["widened"] == report["dropped"] == []
  assert sorted(report["loaded"]) == sorted(rep.loaded) and len(rep.loaded) > 30
  src_params = _flat(src)
  assert sorted(report["frozen"]) == sorted(k for k in src_params
                                            if k.startswith("layers/0/self_attn/"))
  losses = _losses(run)
  first, last = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))
  with capsys.disabled():
    print(f"\nfine-tune 20 steps: loss {first:.4f} (mean of steps 1-5) -> {last:.4f} (16-20); "
          f"per step {[round(x, 3) for x in losses]}")
  assert len(losses) == 20 and last < 0.9 * first  # per-step spread here is ~0.07
  _, raw, _ = wd_lib.load_model(run)
  _, ema, _ = wd_lib.load_model(run, use_ema=True)
  raw, ema = _flat(raw), _flat(ema)
  for k in report["frozen"]:
    np.testing.assert_array_equal(raw[k], src_params[k], err_msg=k)  # bit-identical
    np.testing.assert_allclose(ema[k], src_params[k], rtol=0, atol=1e-6, err_msg=k)
  moved = [k for k in report["loaded"] if k in raw and not np.array_equal(raw[k], src_params[k])]
  assert len(moved) > 20

  # a resumed run restores its checkpoint, not the init; a changed freeze is refused
  train_cli.main(args + ["--init", conv_dir])
  assert "ignored: resuming" in capsys.readouterr().out
  np.testing.assert_array_equal(_flat(wd_lib.load_model(run)[1])["layers/1/ff_in/kernel"],
                                raw["layers/1/ff_in/kernel"])
  cfg_file.write_text(CONFIG_FILE.format(model=dataclasses.asdict(cfg), freeze=""))
  assert train_cli.main(args + ["--config.train.steps=21"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "train.freeze" in err[0], err

  # ARC-Forcing on the fine-tuned run
  arc = str(tmp_path / "arc")
  arc_cli.main(["--config", str(cfg_file), "--base", run, "--data", "synthetic", "--workdir", arc])
  with open(os.path.join(arc, "arc_metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  assert [r["phase"] for r in recs] == ["g", "d"]
  assert all(np.isfinite(r["grad_norm"]) for r in recs)


@pytest.mark.slow
def test_arc_run_source_loads_merged(tmp_path):
  """An arc.py run (registered config, adapter perturbed) as the source: the model starts as the
  base with the adapter merged in, as sampling loads it."""
  from lmdm_jax.training import arc_run
  from lmdm_jax.training.checkpoints import Checkpointer
  conf = load_config("arc_tiny")
  trainer, state, _ = arc_run.build(conf, seed=0, log=lambda *_: None)
  r = np.random.default_rng(0)
  state["adapter"] = jax.tree.map(lambda x: x + 0.05 * r.standard_normal(x.shape, np.float32),
                                  state["adapter"])
  arc = tmp_path / "arc"
  arc.mkdir()
  with open(arc / "arc_config.json", "w") as f:
    json.dump({"config": "arc_tiny", "seed": 0, "base": None, "base_step": None,
               "model": dict(conf.model, positions="authors")}, f)
  ck = Checkpointer(str(arc / arc_run.ARC_DIR))
  ck.save(1, state)
  ck.close()
  merged = arc_run.load_arc_model(str(arc))
  model = DiT(TINY, rngs=nnx.Rngs(9))
  rep = init_model(model, str(arc), load_dit)
  assert rep.kind == "arc" and rep.new == rep.widened == rep.dropped == []
  want = _flat(merged, ...)
  got = _flat(model, ...)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  base = _flat(arc_run.load_arc_model(str(arc), merge=False))  # adapter kept apart: base kernels
  assert not np.array_equal(base["layers/0/ff_in/kernel"], got["layers/0/ff_in/kernel"])
