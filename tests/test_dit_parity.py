"""Parity of lmdm_jax.nn.dit / lmdm_jax.nn.conditioners / lmdm_jax.convert.dit with PyTorch.

References: stable-audio-tools 0.0.20's ``DiffusionTransformer`` and ``NumberConditioner`` (the
real code), and for the LMDM changes (input_add, postpend, router mask, block-causal / enc-dec
masks) ``tests.torch_reference.LMDMDiffusionTransformer``, a re-implementation of
LMDM_REFERENCE.md §1.3-§1.5 on top of the 0.0.20 modules (the authors' fork is not on PyPI).
Tiny random configs in fp32 on CPU; every torch parameter and buffer is randomized (the
zero-initialized out-projections and convs too, else a wrong block could pass). Max abs
differences are printed (run with -s to see them).
"""
import copy
import functools
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import torch_reference

torch = torch_reference.require_torch()
ref = torch_reference.dit_modules()

from lmdm_jax import layouts  # noqa: E402
from lmdm_jax.convert import dit as conv  # noqa: E402
from lmdm_jax.nn import attention as A  # noqa: E402

pytestmark = pytest.mark.slow

TOL = 1e-5
CS, NW = 4, 4  # LMDM test geometry: chunk 4 frames, window of 4 context chunks + 1 target
T_LMDM = (NW + 1) * CS


def model_json(dit_config, *, seconds=None, cond_dim=32, pretransform=None, training=None):
  """A stable-audio-tools model config around ``dit_config`` (``model.diffusion.config``)."""
  cfg = {"model_type": "diffusion_cond", "sample_rate": 44100, "model": {
      "diffusion": {"type": "dit", "diffusion_objective": "rectified_flow",
                    "config": copy.deepcopy(dit_config)},
      "io_channels": dit_config["io_channels"]}}
  if seconds is not None:
    cfg["model"]["conditioning"] = {"cond_dim": cond_dim, "configs": [
        {"id": "prompt", "type": "t5", "config": {"t5_model_name": "t5-base", "max_length": 8}},
        {"id": "seconds_total", "type": "number", "config": seconds}]}
  if pretransform is not None:
    cfg["model"]["pretransform"] = pretransform
  if training is not None:
    cfg["training"] = training
  return cfg


# (a) Stable Audio Open 1.0-like: conditioning tokens not projected (64 wide = 2 KV heads of 32
# for 4 query heads: grouped cross-attention), global token prepended, no qk-norm, full rotary.
BASE = dict(io_channels=8, embed_dim=128, depth=2, num_heads=4, cond_token_dim=64,
            project_cond_tokens=False, global_cond_dim=32, timestep_features_dim=64)
# (b) SAO-small-like: head_dim 64 -> rotary over 32 dims (partial), qk LayerNorm, projected tokens.
SMALL = dict(io_channels=8, embed_dim=128, depth=2, num_heads=2, cond_token_dim=32,
             project_cond_tokens=True, global_cond_dim=32, attn_kwargs={"qk_norm": "ln"})
# LMDM: SMALL + input_add [mask (1) | masked input (8)] + postpend.
LMDM = dict(SMALL, postpend=True, input_add_dims=[["inpaint_mask", 1], ["inpaint_masked_input", 8]])
SECONDS = {"min_val": 0, "max_val": 256}
LMDM_TRAINING = {"inpainting": {"mask_kwargs": {
    "fixed_mask_size": NW * CS, "block_causal_chunk_size": CS, "block_causal_window_chunks": NW}}}


def randomize_(module, seed):
  """Every float parameter and buffer of ``module`` re-drawn (in place), scaled per role."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
      if not t.is_floating_point():
        continue
      r = torch.randn(t.shape, generator=g)
      if name.endswith("inv_freq"):  # loaded, not recomputed: perturb so a recompute would fail
        t.mul_(1 + 0.1 * r.abs())
      elif name.endswith(("gamma", "norm.weight")):
        t.copy_(1 + 0.1 * r)
      elif name.endswith(("beta", "bias")):
        t.copy_(0.1 * r)
      elif name.endswith("timestep_features.weight") or name.endswith("embedding.0.weights"):
        t.copy_(2.0 * r)
      elif t.ndim >= 2:  # 0.5 / sqrt(fan_in): activations stay O(1) through the blocks
        t.copy_(0.5 * r / np.sqrt(t.shape[1] * (t.shape[2] if t.ndim == 3 else 1)))
      else:
        t.copy_(0.1 * r)
  return module.eval()


@functools.lru_cache(maxsize=None)
def torch_base(seed=0):
  return randomize_(ref.DiffusionTransformer(diffusion_objective="rectified_flow", **BASE), seed)


@functools.lru_cache(maxsize=None)
def torch_small(seed=1):
  return randomize_(ref.DiffusionTransformer(diffusion_objective="rectified_flow", **SMALL), seed)


@functools.lru_cache(maxsize=None)
def torch_lmdm(seed=2):
  kw = {k: v for k, v in LMDM.items() if k not in ("postpend", "input_add_dims")}
  return randomize_(ref.LMDMDiffusionTransformer(diffusion_objective="rectified_flow",
                                                 input_add_dim=9, postpend=True, **kw), seed)


@functools.lru_cache(maxsize=None)
def torch_seconds(seed=3, output_dim=32):
  return randomize_(ref.NumberConditioner(output_dim, **SECONDS), seed)


def wrapper_state_dict(dit, seconds=None):
  """The keys of a ConditionedDiffusionModelWrapper: model.model.* and conditioner.*."""
  sd = {f"model.model.{k}": v for k, v in dit.state_dict().items()}
  if seconds is not None:
    sd.update({f"conditioner.conditioners.seconds_total.{k}": v
               for k, v in seconds.state_dict().items()})
  return sd


def convert(dit_cfg, dit, seconds=None, **kw):
  cfg = model_json(dit_cfg, seconds=SECONDS if seconds is not None else None, **kw)
  out = conv.convert_state_dict(cfg, wrapper_state_dict(dit, seconds))
  assert out.report["missing"] == [] and out.report["unexpected"] == []
  return out


def inputs(cfg, b=2, n=12, s=5, seed=0):
  g = torch.Generator().manual_seed(100 + seed)
  x = torch.randn(b, cfg["io_channels"], n, generator=g)
  t = 0.2 + 0.6 * torch.rand(b, generator=g)
  c = torch.randn(b, s, cfg["cond_token_dim"], generator=g)
  gl = torch.randn(b, cfg["global_cond_dim"], generator=g)
  return x, t, c, gl


@functools.partial(nnx.jit, static_argnames=("exit_layer",))
def run(model, *args, **kwargs):
  """``model(*args, **kwargs)`` (``DiT.__call__``), jitted: one compile instead of slow eager ops."""
  return model(*args, **kwargs)


def j(x):
  return jnp.asarray(x.detach().numpy())


def jt(x):
  """torch (B, C, T) -> jax (B, T, C)."""
  return jnp.asarray(x.detach().numpy().transpose(0, 2, 1))


def maxdiff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def check(name, ours, theirs):
  d = maxdiff(ours, theirs)
  print(f"{name}: max abs diff {d:.3g} (max |ref| {float(np.max(np.abs(np.asarray(theirs)))):.3g})")
  assert d <= TOL, f"{name}: {d} > {TOL}"


# --------------------------------------------------------------------------- (a) base SAO 1.0


def test_base_sao10_like_forward():
  tm = torch_base()
  out = convert(BASE, tm)
  cfg = out.config
  assert cfg.global_token == "prepend" and cfg.cross_kv_heads == 2 and cfg.num_heads == 4
  assert cfg.qk_norm == "none" and cfg.rotary_dim == cfg.head_dim == 32
  x, t, c, g = inputs(BASE)
  with torch.no_grad():
    want = tm(x, t, cross_attn_cond=c, global_embed=g).numpy().transpose(0, 2, 1)
    hid = tm(x, t, cross_attn_cond=c, global_embed=g, exit_layer_ix=0).numpy()
  check("(a) base forward", run(out.model, jt(x), j(t), j(c), j(g)), want)
  check("(a) base exit_layer 0", run(out.model, jt(x), j(t), j(c), j(g), exit_layer=0), hid)


# ---------------------------------------------------------------------- (b) SAO-small + (c) seconds


def test_small_forward_exit_cfg_and_seconds_conditioner():
  tm, ts = torch_small(), torch_seconds()
  out = convert(SMALL, tm, ts)
  cfg = out.config
  assert cfg.rotary_dim == 32 and cfg.head_dim == 64 and cfg.qk_norm == "ln"
  secs = [12.0, 300.0]  # 300 is clamped to max_val
  with torch.no_grad():
    s_ref = ts(secs, device="cpu")[0]
  s_ours = out.conditioners["seconds_total"](jnp.asarray(secs))
  check("(c) seconds NumberConditioner", s_ours, s_ref.numpy())
  x, t, prompt, _ = inputs(SMALL, s=6)
  with torch.no_grad():  # the LMDM conditioning: cross = [prompt | seconds], global = seconds
    c, g = torch.cat([prompt, s_ref], 1), s_ref[:, 0]
    want = tm(x, t, cross_attn_cond=c, global_embed=g).numpy().transpose(0, 2, 1)
    hid = tm(x, t, cross_attn_cond=c, global_embed=g, exit_layer_ix=1).numpy()
    w = 3.5
    want_cfg = tm(x, t, cross_attn_cond=c, global_embed=g, cfg_scale=w,
                  apg_scale=0.0).numpy().transpose(0, 2, 1)
  c_j = jnp.concatenate([j(prompt), s_ours], 1)
  g_j = s_ours[:, 0]
  m, b = out.model, x.shape[0]
  # One batch [cond | uncond (zero tokens)]: its first half is the plain conditioned forward.
  v = run(m, jnp.concatenate([jt(x)] * 2), jnp.concatenate([j(t)] * 2),
          jnp.concatenate([c_j, jnp.zeros_like(c_j)]), jnp.concatenate([g_j, g_j]))
  v_c, v_u = v[:b], v[b:]
  check("(b) small forward (conditioned on our seconds tokens)", v_c, want)
  check("(b) small exit_layer 1", run(m, jt(x), j(t), c_j, g_j, exit_layer=1), hid)
  check(f"(b) small CFG w={w}", v_u + w * (v_c - v_u), want_cfg)


# ------------------------------------------------------------------------------------- LMDM


def spec_masks():
  """The §1.5 masks from the formulas (q, k over the T+1 tokens; postpend token index T)."""
  idx = torch.arange(T_LMDM + 1)
  blk = torch.clamp(idx // CS, max=NW)
  bq, bk = blk[:, None], blk[None, :]
  block_causal = (bk >= bq - (NW - 1)) & (bk <= bq)
  ctx = NW * CS
  enc_dec = (idx[None, :] < ctx) | (idx[:, None] >= ctx)
  return {"block_causal": block_causal, "enc_dec": enc_dec}


def our_masks():
  """The same masks from lmdm_jax: streaming_mask over window_layout (context_chunks K = NW - 1
  for block-causal; bidirectional context with K = NW for enc-dec, as sampling.py builds them)."""
  win = layouts.window_layout(NW, CS)
  return {"block_causal": A.streaming_mask(win.all, win.all, NW - 1),
          "enc_dec": A.streaming_mask(win.all, win.all, NW, bidirectional_context=True)}


def lmdm_inputs(seed=0, b=2):
  x, t, c, g = inputs(LMDM, b=b, n=T_LMDM, seed=seed)
  gen = torch.Generator().manual_seed(7 + seed)
  ctx_len = NW * CS
  m = torch.zeros(b, 1, T_LMDM)
  m[:, :, :ctx_len] = 1.0
  clean = torch.randn(b, 8, T_LMDM, generator=gen)
  clean[1, :, :CS] = 0.0  # a dropped context chunk: zeroed, mask stays 1 (§2 step 3)
  a = torch.cat([m, clean * m], 1)  # input_add = [inpaint_mask | inpaint_masked_input]
  return x, t, c, g, a, m


@pytest.mark.parametrize("pattern", ["block_causal", "enc_dec"])
def test_lmdm_masks_match_spec(pattern):
  np.testing.assert_array_equal(np.asarray(our_masks()[pattern]), spec_masks()[pattern].numpy())


def test_lmdm_forward_masks_exit_and_split_layout():
  tm = torch_lmdm()
  out = convert(LMDM, tm, training=LMDM_TRAINING)
  cfg = out.config
  assert cfg.global_token == "postpend" and cfg.input_add_dim == 9
  assert (cfg.chunk, cfg.context_chunks, cfg.window_chunks) == (CS, NW - 1, NW)
  x, t, c, g, a, m = lmdm_inputs()
  r = 1.0 - m
  spec, ours = spec_masks(), our_masks()
  for pattern in ("block_causal", "enc_dec", None):
    with torch.no_grad():
      want = tm.lmdm_forward(x, t, c, g, a, r, None if pattern is None else spec[pattern])
    # no mask: torch attends unmasked; ours gets an all-True mask (same jit trace as the others)
    got = run(out.model, jt(x), j(t), j(c), j(g), input_add=jt(a), context_mask=j(m[:, 0]),
              mask=jnp.ones((T_LMDM + 1,) * 2, bool) if pattern is None else ours[pattern])
    check(f"LMDM forward, mask {pattern}", got, want.numpy().transpose(0, 2, 1))
  with torch.no_grad():
    hid = tm.lmdm_forward(x, t, c, g, a, r, spec["block_causal"], exit_layer_ix=0).numpy()
  got = run(out.model, jt(x), j(t), j(c), j(g), input_add=jt(a), context_mask=j(m[:, 0]),
                  mask=ours["block_causal"], exit_layer=0)
  check("LMDM exit_layer 0 (block-causal)", got, hid)
  # ARC / KV-cache checkpoints store the self-attention as to_q + to_kv: same model.
  sd = conv.to_torch_state_dict(out.model, split_qkv=True)
  assert not any("self_attn.to_qkv" in k for k in sd)
  split = conv.convert_state_dict(model_json(LMDM, training=LMDM_TRAINING), sd)
  assert_same_params(split.model, out.model)


# ------------------------------------------------------------- converter coverage, errors, I/O


def flat(module):
  return {"/".join(map(str, p)): np.asarray(v) for p, v in
          nnx.to_flat_state(nnx.state(module))}


def assert_same_params(a, b):
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.mark.parametrize("which", ["base", "small", "lmdm"])
def test_every_torch_key_is_consumed_and_round_trip_is_exact(which):
  dit_cfg, tm, ts = {"base": (BASE, torch_base(), None), "small": (SMALL, torch_small(), torch_seconds()),
                     "lmdm": (LMDM, torch_lmdm(), torch_seconds())}[which]
  sd = wrapper_state_dict(tm, ts)
  out = conv.convert_state_dict(model_json(dit_cfg, seconds=SECONDS if ts is not None else None),
                                sd)
  assert sorted(out.report["used"]) == sorted(sd), "converter left torch keys unused"
  # Flax -> PyTorch: loads strictly into the reference modules, equal to the source tensors.
  back = conv.to_torch_state_dict(out.model, out.conditioners)
  assert back.keys() == sd.keys()
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k].numpy(), err_msg=k)
  tm2 = copy.deepcopy(tm)
  tm2.load_state_dict({k[len("model.model."):]: torch.from_numpy(v) for k, v in back.items()
                       if k.startswith("model.model.")}, strict=True)
  # ... and PyTorch -> Flax again: exact.
  again = conv.convert_state_dict(model_json(dit_cfg, seconds=SECONDS if ts is not None else None),
                                  wrapper_state_dict(tm2, ts))
  assert_same_params(again.model, out.model)
  for cid in out.conditioners:
    assert_same_params(again.conditioners[cid], out.conditioners[cid])


def test_unknown_missing_and_misshapen_keys_raise():
  cfg = model_json(SMALL, seconds=SECONDS)
  sd = wrapper_state_dict(torch_small(), torch_seconds())
  bad = dict(sd, **{"model.model.transformer.layers.0.self_attn.extra.weight": torch.zeros(2)})
  with pytest.raises(ValueError, match=r"transformer\.layers\.0\.self_attn\.extra\.weight"):
    conv.convert_state_dict(cfg, bad)
  assert conv.convert_state_dict(cfg, bad, allow_unexpected=True).report["unexpected"] == [
      "model.model.transformer.layers.0.self_attn.extra.weight"]
  key = "model.model.transformer.layers.1.ff.ff.2.bias"
  miss = {k: v for k, v in sd.items() if k != key}
  with pytest.raises(ValueError, match=r"missing keys: \['transformer\.layers\.1\.ff\.ff\.2\.bias'\]"):
    conv.convert_state_dict(cfg, miss)
  assert conv.convert_state_dict(cfg, miss, allow_missing=True).report["missing"] == [
      "transformer.layers.1.ff.ff.2.bias"]
  key = "conditioner.conditioners.seconds_total.embedder.embedding.1.weight"
  shaped = dict(sd, **{key: torch.zeros(32, 100)})
  with pytest.raises(ValueError, match="wrongly shaped.*" + key.replace(".", r"\.")):
    conv.convert_state_dict(cfg, shaped, allow_missing=True, allow_unexpected=True)
  with pytest.raises(ValueError, match="unsupported settings"):
    conv.dit_config_from_json(model_json(dict(SMALL, global_cond_type="adaLN")))
  with pytest.raises(ValueError, match="unsupported keys"):
    conv.dit_config_from_json(model_json(dict(SMALL, mystery_option=3)))


def test_ckpt_safetensors_pretransform_orbax_and_cli(tmp_path):
  from safetensors.torch import save_file

  from lmdm_jax.convert.__main__ import main
  from tests.test_oobleck_parity import make_reference, tiny_config
  vae_cfg = tiny_config()
  vae = make_reference(vae_cfg, seed=5)
  cfg = model_json(LMDM, seconds=SECONDS, pretransform=vae_cfg, training=LMDM_TRAINING)
  sd = wrapper_state_dict(torch_lmdm(), torch_seconds())
  sd.update({f"pretransform.model.{k}": v for k, v in vae.model.state_dict().items()})
  ckpt = tmp_path / "lmdm.ckpt"
  torch.save({"state_dict": {f"diffusion.{k}": v for k, v in sd.items()},
              "global_step": 3}, ckpt)
  st = tmp_path / "lmdm.safetensors"
  save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
  direct = conv.convert_state_dict(cfg, sd)
  assert direct.pretransform is not None and sorted(direct.report["used"]) == sorted(sd)
  from_ckpt = conv.convert_checkpoint(cfg, str(ckpt))
  assert sorted(from_ckpt.report["used"]) == sorted(f"diffusion.{k}" for k in sd)
  from_st = conv.convert_checkpoint(cfg, str(st))
  for other in (from_ckpt, from_st):
    assert_same_params(other.model, direct.model)
    assert_same_params(other.conditioners["seconds_total"], direct.conditioners["seconds_total"])
    assert_same_params(other.pretransform, direct.pretransform)
  # CLI: config + .ckpt -> orbax directory; load_converted restores the same model.
  cfg_path = tmp_path / "model_config.json"
  import json
  cfg_path.write_text(json.dumps(cfg))
  out_dir = tmp_path / "converted"
  assert main([str(cfg_path), str(ckpt), str(out_dir)]) == 0
  assert os.path.isdir(out_dir)
  with pytest.raises(ValueError, match="exists"):
    conv.save_converted(str(out_dir), direct.config, direct.model)
  dcfg, model, conds = conv.load_converted(str(out_dir))
  assert dcfg == direct.config
  assert_same_params(model, direct.model)
  assert_same_params(conds["seconds_total"], direct.conditioners["seconds_total"])
  assert_same_params(conv.load_converted_pretransform(str(out_dir)), direct.pretransform)
  # sample.py's loader takes the converted directory and streams from it
  from lmdm_jax import sampling as S
  from lmdm_jax.checkpoint_io import load_model
  lcfg, lmodel, extras = load_model(str(out_dir))
  assert lcfg == direct.config and "seconds_total" in extras["conditioners"]
  assert_same_params(lmodel, direct.model)
  stream = S.Stream(lmodel, batch=1, cross_len=3, sampler=S.SamplerParams.make(steps=2))
  stream.set_prompt(np.zeros((1, 3, lcfg.cond_token_dim), np.float32))
  assert stream.next_block().shape == (1, lcfg.chunk, lcfg.io_channels)
  with pytest.raises(ValueError, match="neither a train.py work directory"):
    load_model(str(tmp_path))


def test_lmdm_saos_config_maps_to_our_saos_config():
  """The DiT part of the authors' saos_block_causal.json gives configs/saos (340.95 M params)."""
  from lmdm_jax.config import DiTConfig, load_config
  from lmdm_jax.nn.dit import abstract_model, count_params
  dit = dict(io_channels=64, embed_dim=1024, depth=16, num_heads=8, cond_token_dim=768,
             global_cond_dim=768, postpend=True, transformer_type="continuous_transformer",
             input_add_dims=[["inpaint_mask", 1], ["inpaint_masked_input", 64]],
             attn_kwargs={"qk_norm": "ln"})
  training = {"inpainting": {"mask_kwargs": {"fixed_mask_size": 192, "block_causal_chunk_size": 48,
                                             "block_causal_window_chunks": 4}}}
  cfg = conv.dit_config_from_json(model_json(dit, seconds=SECONDS, cond_dim=768, training=training))
  assert cfg == DiTConfig.from_config(load_config("saos").model)
  assert count_params(abstract_model(cfg)) == 340_946_048
