"""The `live` config (issue 15 item 1): at least 6 s of context at `demo`'s short blocks, the
authors' positions, stage-1 sequences long enough for a full context, start sequences on; it
builds, it and `arc_live` train from the command line at a reduced width, and its long-context
geometry streams exactly (cached == teacher-forcing forward)."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmdm_jax import layouts
from lmdm_jax import sampling as S
from lmdm_jax.codecs.spectral import SpectralCodec
from lmdm_jax.config import DiTConfig, load_config
from lmdm_jax.nn.dit import DiT
from lmdm_jax.testing import random_model, rel_err
from lmdm_jax.training.stage1 import Stage1, Stage1Config


def seconds(cfg: DiTConfig, chunks: int) -> float:
  """Seconds of audio in ``chunks`` chunks of the spectral codec's latent frames."""
  return chunks * cfg.chunk * SpectralCodec.hop / SpectralCodec.sample_rate


def test_live_sees_six_seconds_in_short_blocks():
  live, demo = load_config("live"), load_config("demo")
  cfg, dcfg = DiTConfig.from_config(live.model), DiTConfig.from_config(demo.model)
  assert live.codec == demo.codec == "spectral"
  assert SpectralCodec.sample_rate / SpectralCodec.hop == pytest.approx(43.07, abs=0.01)
  assert seconds(cfg, cfg.context_chunks) >= 6.0  # 17 x 16 frames: 6.32 s
  assert seconds(dcfg, dcfg.context_chunks) < 1.2  # demo: 1.11 s
  assert cfg.chunk == dcfg.chunk == 16 and seconds(cfg, 1) < 0.4  # blocks stay 0.37 s
  # the authors' window: W >= K, one chunk more as theirs (4 / 3) and demo's
  assert (cfg.positions, cfg.window_chunks) == ("authors", cfg.context_chunks + 1)
  assert layouts.start_chunks(cfg) == cfg.window_chunks
  # the same model otherwise: codec width, prompt encoder, input_add groups, width and depth
  for f in ("io_channels", "embed_dim", "depth", "num_heads", "cond_token_dim", "input_add_dim"):
    assert getattr(cfg, f) == getattr(dcfg, f), f
  assert live.conditioner.to_dict() == demo.conditioner.to_dict()
  tc = Stage1Config.from_config(live.train.stage1)
  assert tc.chunks >= cfg.context_chunks + 3  # the last noisy chunks see a full context
  assert 0 < tc.p_start < 1 and tc.chunks > layouts.start_chunks(cfg)
  assert live.train.ckpt_every <= 50


def test_arc_live_rolls_out_past_the_context():
  arc, live, arc_demo = load_config("arc_live"), load_config("live"), load_config("arc_demo")
  assert arc.model.to_dict() == live.model.to_dict()
  assert arc.arc.rollout_blocks > live.model.context_chunks  # the last blocks see only rollout
  assert arc.sampler.steps == arc_demo.sampler.steps == arc.arc.steps
  rest = dict(arc.arc.to_dict(), rollout_blocks=arc_demo.arc.rollout_blocks)
  assert rest == arc_demo.arc.to_dict()
  for section in ("adapter", "head", "arc_train"):
    assert arc[section].to_dict() == arc_demo[section].to_dict(), section


def test_live_model_and_trainer_build():
  live = load_config("live")
  cfg = DiTConfig.from_config(live.model)
  model = DiT(cfg, rngs=nnx.Rngs(0))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == 8_422_976  # demo's: K and W add no parameters
  tr = Stage1(model, Stage1Config.from_config(live.train.stage1))
  assert tr.frames == 20 * 16 and tr.n_start == 18
  assert tr.base_mask.shape == (20 * 16 + 20 * 17,) * 2


@pytest.mark.slow
def test_live_and_arc_live_train_from_the_command_line_at_reduced_width(tmp_path):
  from lmdm_jax.apps import arc_cli, train_cli
  wd = str(tmp_path / "run")
  small = ["--config.model.embed_dim=64", "--config.model.depth=1", "--config.model.num_heads=1"]
  argv = ["--config", "live", "--workdir", wd, "--no_progress", *small,
          "--config.train.batch_size=2", "--config.train.steps=3", "--config.train.log_every=1",
          "--config.train.eval_batches=1", "--config.train.stage1.p_start=0.5"]
  assert not train_cli.main(argv)  # None or 0: success
  with open(os.path.join(wd, "config.json")) as f:
    rec = json.load(f)
  assert rec["config"] == "live"
  assert (rec["model"]["context_chunks"], rec["model"]["window_chunks"]) == (17, 18)
  assert rec["overrides"]["train.stage1.p_start"] == 0.5
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  losses = [r["loss"] for r in recs if "loss" in r]
  assert len(losses) == 3 and all(np.isfinite(losses))
  assert any(np.isfinite(r.get("heldout_loss", np.nan)) for r in recs)
  # ARC-Forcing on it: one G and one D step with 20-block rollouts after the 17-chunk context
  arc_wd = str(tmp_path / "arc")
  argv = ["--config", "arc_live", "--base", wd, "--data", "synthetic", "--workdir", arc_wd,
          *small, "--config.arc.disc_exit_layer=0", "--config.arc_train.steps=2",
          "--config.arc_train.batch_size=2", "--config.arc_train.log_every=1"]
  assert not arc_cli.main(argv)
  with open(os.path.join(arc_wd, "arc_metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  assert len(recs) == 2 and all(np.isfinite(v) for r in recs for v in r.values()
                                if isinstance(v, float)), recs


@pytest.mark.slow
def test_live_geometry_stream_equals_teacher_forcing():
  """`live`'s K = 17, W = 18 at tiny width: 40 streamed blocks (past the 18 zero start chunks
  and a whole context of generated ones) equal the full-sequence forward over the stream."""
  cfg = DiTConfig.from_config(load_config("tiny").model)
  cfg = dataclasses.replace(cfg, context_chunks=17, window_chunks=18)
  model = random_model(cfg, seed=5)
  n, steps = 40, 3
  sp = S.SamplerParams.make(steps=steps, pingpong=False)
  tables = S.rope_window_tables(model)
  rng = np.random.default_rng(5)
  prompt = (jnp.asarray(rng.normal(size=(1, 5, cfg.cond_token_dim)), jnp.float32),
            jnp.asarray(rng.normal(size=(1, cfg.global_cond_dim)), jnp.float32))
  st = S.set_prompt(model, S.init_state(cfg, "block_causal", 1, False, 5, seed=3), *prompt)
  assert st.cache.k.shape[2] == 17 * cfg.chunk  # the ring holds K chunks
  step = jax.jit(lambda st, e: S.generate_block(model, tables, st, e, sp, "block_causal"))
  extra = jnp.zeros((1, cfg.chunk, 0))
  blocks, xs, vs = [], [], []
  for _ in range(n):
    blk, st, last = step(st, extra)
    blocks.append(blk)
    xs.append(last.x)
    vs.append(last.v)
  start = S.start_context(cfg, 1)
  n0 = start.shape[1] // cfg.chunk
  assert n0 == 18
  layout = layouts.sequence_layout(n0 + n, np.arange(n0, n0 + n), layouts.span(cfg), cfg.chunk)
  t_last = float(S.schedule(steps)[steps - 1])
  v_full = layouts.sequence_forward(
      model, jnp.concatenate([start] + blocks, 1), jnp.concatenate(xs, 1),
      jnp.full((1, n), t_last), st.cache.cross(), st.cache.global_embed, layout)
  v_stream = jnp.concatenate(vs, 1)
  cs = cfg.chunk
  errs = [rel_err(v_stream[:, i * cs:(i + 1) * cs], v_full[:, i * cs:(i + 1) * cs])
          for i in range(n)]
  print(f"live geometry, {n} blocks: max per-block rel err {max(errs):.2e}")
  assert max(errs) < 1e-4
