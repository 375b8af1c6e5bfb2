"""From PyTorch weights to sound: tiny random stable-audio-tools / LMDM checkpoints written in
every layout the authors' code writes -> ``python3 -m lmdm_jax.convert`` -> ``sample.py
--checkpoint`` -> a 44.1 kHz stereo WAV of the right length; the conditioning (T5 tokens + seconds
tokens, global seconds vector) against stable-audio-tools' own modules; export back to a
stable-audio-tools checkpoint, bit for bit.

The PyTorch side: a tiny random T5 (``transformers``, saved to a local folder with a word-level
tokenizer), a tiny Oobleck VAE with the real 2048-sample hop (2 audio channels, 4 conv channels),
and either the whole base model built by stable-audio-tools' ``create_model_from_config`` (T5 +
seconds_start + seconds_total conditioners, like Stable Audio Open) or the LMDM pieces (the
``tests.torch_reference`` LMDM DiT + a seconds_total ``NumberConditioner``; stable-audio-tools
0.0.20 cannot build a DiT with ``input_add_dims`` / ``postpend`` itself).
"""
import copy
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from tests import torch_reference

torch = torch_reference.require_torch()
transformers = torch_reference.transformers()
sat = torch_reference.stable_audio_tools()

from lmdm_jax.convert import dit as conv  # noqa: E402
from lmdm_jax.convert import export as conv_export  # noqa: E402
from lmdm_jax.convert import load as conv_load  # noqa: E402
from lmdm_jax.convert.__main__ import main as convert_main  # noqa: E402
from tests.test_dit_parity import randomize_  # noqa: E402
from tests.test_oobleck_parity import make_reference  # noqa: E402
from tests.test_t5_parity import save_word_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning"),
              pytest.mark.slow]  # PyTorch checkpoints, conversions, sample.py subprocesses

T5_WIDTH = 512  # stable-audio-tools' width of "t5-small": tokens are used unprojected
HOP, SR = 2048, 44100
VAE = {"type": "autoencoder", "config": {
    "encoder": {"type": "oobleck", "config": {"in_channels": 2, "channels": 4,
                                              "c_mults": [1, 1, 1, 1, 1], "strides": [2, 4, 4, 8, 8],
                                              "latent_dim": 16, "use_snake": True}},
    "decoder": {"type": "oobleck", "config": {"out_channels": 2, "channels": 4,
                                              "c_mults": [1, 1, 1, 1, 1], "strides": [2, 4, 4, 8, 8],
                                              "latent_dim": 8, "use_snake": True,
                                              "final_tanh": False}},
    "bottleneck": {"type": "vae"}, "latent_dim": 8, "downsampling_ratio": HOP, "io_channels": 2}}
DIT = {"io_channels": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "cond_token_dim": T5_WIDTH,
       "transformer_type": "continuous_transformer", "attn_kwargs": {"qk_norm": "ln"}}
CHUNK = 8
LMDM_MASK = {"fixed_mask_size": 2 * CHUNK, "context_router_attention_pattern": "block-causal",
             "block_causal_chunk_size": CHUNK, "block_causal_window_chunks": 3}


def t5_entry(t5_dir=None):
  cfg = {"t5_model_name": "t5-small", "max_length": 8}
  if t5_dir:
    cfg["model_path"] = t5_dir
  return {"id": "prompt", "type": "t5", "config": cfg}


def seconds_entry(cid):
  return {"id": cid, "type": "number", "config": {"min_val": 0, "max_val": 256}}


def lmdm_config():
  """LMDM (saos_block_causal.json shrunk): T5 prompt + seconds_total, postpend, input_add."""
  dc = dict(DIT, global_cond_dim=T5_WIDTH, postpend=True,
            input_add_dims=[["inpaint_mask", 1], ["inpaint_masked_input", 8]])
  return {"model_type": "diffusion_cond", "sample_rate": SR, "audio_channels": 2, "model": {
      "pretransform": copy.deepcopy(VAE),
      "conditioning": {"cond_dim": T5_WIDTH, "configs": [t5_entry(), seconds_entry("seconds_total")]},
      "diffusion": {"cross_attention_cond_ids": ["prompt", "seconds_total"],
                    "global_cond_ids": ["seconds_total"],
                    "input_add_ids": [["inpaint_mask", 1], ["inpaint_masked_input", 8]],
                    "diffusion_objective": "rectified_flow", "type": "dit", "config": dc},
      "io_channels": 8},
      "training": {"inpainting": {"mask_kwargs": dict(LMDM_MASK)}}}


def base_config(t5_dir):
  """Stable Audio Open-like base model (no input_add): T5 + seconds_start + seconds_total, the
  global vector is [seconds_start | seconds_total]."""
  dc = dict(DIT, global_cond_dim=2 * T5_WIDTH)
  return {"model_type": "diffusion_cond", "sample_rate": SR, "audio_channels": 2, "model": {
      "pretransform": copy.deepcopy(VAE),
      "conditioning": {"cond_dim": T5_WIDTH, "configs": [
          t5_entry(t5_dir), seconds_entry("seconds_start"), seconds_entry("seconds_total")]},
      "diffusion": {"cross_attention_cond_ids": ["prompt", "seconds_start", "seconds_total"],
                    "global_cond_ids": ["seconds_start", "seconds_total"],
                    "diffusion_objective": "rectified_flow", "type": "dit", "config": dc},
      "io_channels": 8}}


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
  return make_t5_dir(str(tmp_path_factory.mktemp("t5")))


def make_t5_dir(path):
  """A tiny random T5 encoder with a word-level tokenizer saved in the folder ``path``."""
  cfg = transformers.T5Config(
      vocab_size=64, d_model=T5_WIDTH, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
      num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
      dropout_rate=0.0, feed_forward_proj="relu", pad_token_id=0, eos_token_id=1)
  torch.manual_seed(0)
  transformers.T5EncoderModel(cfg).eval().save_pretrained(path)
  save_word_tokenizer(path)
  # tokenizer_config.json too, so that stable-audio-tools' AutoTokenizer reads the same tokenizer
  transformers.PreTrainedTokenizerFast(
      tokenizer_file=os.path.join(path, "tokenizer.json"), pad_token="<pad>", eos_token="</s>",
      unk_token="<unk>").save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def lmdm_state_dict():
  """The keys of the LMDM ConditionedDiffusionModelWrapper (model.model.*, conditioner.*,
  pretransform.model.*), random weights."""
  dc = {k: v for k, v in lmdm_config()["model"]["diffusion"]["config"].items()
        if k not in ("postpend", "input_add_dims", "transformer_type")}
  ref = torch_reference.dit_modules()
  dit = randomize_(ref.LMDMDiffusionTransformer(diffusion_objective="rectified_flow",
                                                input_add_dim=9, postpend=True, **dc), 7)
  secs = randomize_(ref.NumberConditioner(T5_WIDTH, min_val=0, max_val=256), 8)
  vae = make_reference(copy.deepcopy(VAE), seed=9)
  sd = {f"model.model.{k}": v for k, v in dit.state_dict().items()}
  sd.update({f"conditioner.conditioners.seconds_total.{k}": v for k, v in secs.state_dict().items()})
  sd.update({f"pretransform.model.{k}": v for k, v in vae.model.state_dict().items()})
  return sd


@pytest.fixture(scope="module")
def base_model(t5_dir):
  return make_base_model(t5_dir)


def make_base_model(t5_dir):
  """The whole base model from stable-audio-tools' factory, randomized (T5 stays outside the
  state_dict, as in the reference)."""
  from stable_audio_tools.models.factory import create_model_from_config
  torch.manual_seed(1)
  model = create_model_from_config(base_config(t5_dir)).eval()
  randomize_(model.model, 11)
  randomize_(model.conditioner, 12)
  with torch.no_grad():  # the VAE keeps its factory init; its biases and snakes are randomized
    for name, p in model.pretransform.model.named_parameters():
      if name.endswith(("alpha", "beta", "bias")):
        p.copy_(0.2 * torch.randn_like(p))
  # stable-audio-tools loads T5 in float16 (its weights rounded); compare with the float32 one
  model.conditioner.conditioners["prompt"].__dict__["model"] = (
      transformers.T5EncoderModel.from_pretrained(t5_dir).eval())
  return model


def write_json(path, obj):
  path.write_text(json.dumps(obj))
  return str(path)


def flat(module):
  return {"/".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(module))}


def assert_same(a, b):
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def child_env():
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("JAX_PLATFORMS", "cpu")
  return env


def sample_module():
  from lmdm_jax.apps import sample_cli
  return sample_cli


def expected_samples(seconds, chunk=CHUNK):
  """sample.py writes whole blocks of ``chunk`` latent frames covering ``seconds``."""
  block_s = chunk * HOP / SR
  return int(np.ceil(seconds / block_s - 1e-9)) * chunk * HOP


# ------------------------------------------------------------------------------- the system


def test_lmdm_checkpoint_converts_samples_and_exports_back(tmp_path, lmdm_state_dict, t5_dir):
  """Lightning .ckpt -> convert (no flags) -> sample.py --checkpoint --t5 (subprocess) -> WAV;
  export -> convert again: the same arrays."""
  import soundfile as sf
  cfg_path = write_json(tmp_path / "model_config.json", lmdm_config())
  ckpt = tmp_path / "lmdm.ckpt"
  torch.save({"state_dict": {f"diffusion.{k}": v for k, v in lmdm_state_dict.items()},
              "global_step": 5, "epoch": 0}, ckpt)
  out = tmp_path / "converted"
  assert convert_main([cfg_path, str(ckpt), str(out)]) == 0
  wav = tmp_path / "x.wav"
  r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--checkpoint", str(out),
                      "--t5", t5_dir, "--seconds", "3", "--out", str(wav), "--no-progress",
                      "--prompt", "a calm piano melody"],
                     cwd=str(tmp_path), env=child_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "seconds_total 12" in r.stdout and "regime block_causal" in r.stdout, r.stdout
  audio, sr = sf.read(str(wav), always_2d=True)
  assert sr == SR and audio.shape == (expected_samples(3), 2), (sr, audio.shape)
  assert np.isfinite(audio).all() and np.abs(audio).max() > 0
  # export back to stable-audio-tools, convert the export again: bit for bit
  exp = tmp_path / "exported"
  assert conv_export.main([str(out), str(exp)]) == 0
  again = conv.convert_checkpoint(json.loads((exp / "model_config.json").read_text()),
                                  str(exp / "model.safetensors"))
  first = conv.convert_checkpoint(lmdm_config(), str(ckpt))
  assert again.report["missing"] == again.report["unexpected"] == []
  assert_same(again.model, first.model)
  assert_same(again.conditioners["seconds_total"], first.conditioners["seconds_total"])
  assert_same(again.pretransform, first.pretransform)
  # ... and the exported DiT keys are the PyTorch source tensors, exactly
  from safetensors.numpy import load_file
  back = load_file(str(exp / "model.safetensors"))
  for k, v in lmdm_state_dict.items():
    if not k.startswith("pretransform."):
      np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)


def test_conditioning_matches_stable_audio_tools(tmp_path, base_model, t5_dir):
  """Cross tokens [T5 | seconds_start | seconds_total] and global [seconds_start |
  seconds_total] equal MultiConditioner + get_conditioning_inputs on the same weights."""
  sd = base_model.state_dict()
  cfg_path = write_json(tmp_path / "base.json", base_config(t5_dir))
  st = tmp_path / "base.safetensors"
  from safetensors.torch import save_file
  save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
  out = tmp_path / "converted"
  assert convert_main([cfg_path, str(st), str(out)]) == 0
  system = conv_load.load(str(out))  # the T5 folder comes from the config's model_path
  prompts = ["a calm piano melody", "fast techno beat with warm bass", ""]
  starts, totals = [0.0, 7.5, 300.0], [12.0, 30.0, 47.25]  # 300 > max_val: clamped
  meta = [{"prompt": p, "seconds_start": s, "seconds_total": t}
          for p, s, t in zip(prompts, starts, totals)]
  with torch.no_grad():
    ref = base_model.get_conditioning_inputs(base_model.conditioner(meta, "cpu"))
  cross, glob = system.condition(prompts, seconds_total=np.array(totals),
                                 seconds_start=np.array(starts))
  assert cross.shape == (3, 8 + 2, T5_WIDTH) and glob.shape == (3, 2 * T5_WIDTH)
  d_cross = np.abs(cross - ref["cross_attn_cond"].numpy()).max()
  d_glob = np.abs(glob - ref["global_cond"].numpy()).max()
  print(f"conditioning vs stable-audio-tools: cross {d_cross:.3g}, global {d_glob:.3g}")
  assert d_cross < 1e-5 and d_glob < 1e-5
  assert system.sampler["regime"] == "clip" and system.cross_len == 10


def test_base_checkpoint_samples_whole_clips(tmp_path, base_model, t5_dir, capsys):
  """A base model (no input_add, like SAO-small itself) converts and samples whole clips."""
  import soundfile as sf
  ckpt = tmp_path / "base.ckpt"  # an export_model .ckpt: {"state_dict": wrapper keys}
  torch.save({"state_dict": base_model.state_dict()}, ckpt)
  out = tmp_path / "converted"
  assert convert_main([write_json(tmp_path / "c.json", base_config(t5_dir)), str(ckpt),
                       str(out)]) == 0
  wav = tmp_path / "clip.wav"
  sample = sample_module()
  assert sample.main(["--checkpoint", str(out), "--seconds", "1", "--out", str(wav),
                      "--no-progress", "--steps", "2"]) == 0
  log = capsys.readouterr().out
  chunk = conv.load_converted(str(out))[0].chunk  # 48: no streaming geometry in a base config
  n = expected_samples(1, chunk)
  assert "regime clip" in log and f"seconds_total {n / SR:g}" in log, log
  audio, sr = sf.read(str(wav), always_2d=True)
  assert sr == SR and audio.shape == (n, 2)
  # a streaming regime is refused in one line; so is a prompt change inside a clip
  from lmdm_jax.system import load_system
  base = load_system(str(out), codec="none", log=lambda *_: None)
  with pytest.raises(ValueError, match="cannot stream"):
    base.stream("x", seconds=1.0, regime="block_causal")
  clip = base.stream("x", seconds=1.0)
  clip.next_latents()
  with pytest.raises(ValueError):  # a base model cannot change prompt inside a clip
    clip.set_prompt("y")
  # export: loads strictly into stable-audio-tools' own model (DiT, conditioners, VAE)
  exp = tmp_path / "exported"
  conv_export.export(str(out), str(exp))
  from safetensors.torch import load_file
  from stable_audio_tools.models.factory import create_model_from_config
  rebuilt = create_model_from_config(json.loads((exp / "model_config.json").read_text()))
  rebuilt.load_state_dict(load_file(str(exp / "model.safetensors")), strict=True)
  for k, v in base_model.model.state_dict().items():
    torch.testing.assert_close(rebuilt.model.state_dict()[k], v, rtol=0, atol=0)


# ------------------------------------------------------------------------------- layouts


class NotAWeight:
  """Unpickling this needs code from this module: weights_only=True refuses it."""


def arc_layout(sd):
  """An ARC-Forcing Lightning checkpoint: split self-attention q / kv, diffusion. prefix, and the
  discriminator (a whole base model) and its head."""
  out = {}
  for k, v in sd.items():
    if k.endswith("self_attn.to_qkv.weight"):
      d = v.shape[1]
      out["diffusion." + k.replace("to_qkv", "to_q")] = v[:d].clone()
      out["diffusion." + k.replace("to_qkv", "to_kv")] = v[d:].clone()
    else:
      out["diffusion." + k] = v
  out["discriminator.model.model.transformer.layers.0.self_attn.to_qkv.weight"] = torch.zeros(6, 2)
  out["discriminator.conditioner.conditioners.seconds_total.embedder.embedding.0.weights"] = (
      torch.zeros(4))
  out["discriminator_head.proj_in.weight_v"] = torch.zeros(3, 2, 7)
  out["discriminator_head.proj_in.bias"] = torch.zeros(3)
  return out


def test_every_layout_converts_without_flags(tmp_path, lmdm_state_dict, capsys):
  """export_model .ckpt, safetensors and the ARC-Forcing Lightning checkpoint: same arrays."""
  from safetensors.torch import save_file
  cfg_path = write_json(tmp_path / "model_config.json", lmdm_config())
  plain = tmp_path / "export.ckpt"
  torch.save({"state_dict": lmdm_state_dict}, plain)
  st = tmp_path / "model.safetensors"
  save_file({k: v.contiguous() for k, v in lmdm_state_dict.items()}, str(st))
  arc = tmp_path / "arc.ckpt"
  torch.save({"state_dict": arc_layout(lmdm_state_dict), "global_step": 1000}, arc)
  outs = {}
  for name, path in (("plain", plain), ("st", st), ("arc", arc)):
    outs[name] = tmp_path / f"conv_{name}"
    assert convert_main([cfg_path, str(path), str(outs[name])]) == 0
  log = capsys.readouterr().out
  dropped = [line for line in log.splitlines() if "dropped by name" in line]
  assert len(dropped) == 1 and "discriminator.* (2 keys" in dropped[0] and (
      "discriminator_head.* (2 keys" in dropped[0]), log
  ref = conv.load_converted(str(outs["plain"]))
  for name in ("st", "arc"):
    other = conv.load_converted(str(outs[name]))
    assert other[0] == ref[0]
    assert_same(other[1], ref[1])
    assert_same(other[2]["seconds_total"], ref[2]["seconds_total"])
  # pickles load with weights_only=True: a file that needs code to unpickle is refused
  evil = tmp_path / "evil.ckpt"
  torch.save({"state_dict": lmdm_state_dict, "obj": NotAWeight()}, evil)
  assert convert_main([cfg_path, str(evil), str(tmp_path / "conv_evil")]) == 2
  assert "--trust-pickle" in capsys.readouterr().err


def test_missing_pieces_get_one_error_naming_the_flags(tmp_path, lmdm_state_dict, t5_dir, capsys):
  sd = {k: v for k, v in lmdm_state_dict.items() if not k.startswith("pretransform.")}
  ckpt = tmp_path / "dit_only.ckpt"
  torch.save({"state_dict": sd}, ckpt)
  cfg = lmdm_config()
  del cfg["model"]["pretransform"]
  out = tmp_path / "converted"
  assert convert_main([write_json(tmp_path / "c.json", cfg), str(ckpt), str(out)]) == 0
  with pytest.raises(conv_load.NotSampleable) as e:
    conv_load.load(str(out))
  msg = str(e.value)
  assert "--t5 DIR" in msg and "--vae PATH" in msg and "t5-small" in msg, msg
  sample = sample_module()
  assert sample.main(["--checkpoint", str(out), "--out", str(tmp_path / "x.wav")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--t5 DIR" in err[0] and "--vae PATH" in err[0], err
  # a VAE from another converted directory and the T5 folder make it sampleable
  full = tmp_path / "with_vae"
  torch.save({"state_dict": lmdm_state_dict}, tmp_path / "full.ckpt")
  assert convert_main([write_json(tmp_path / "f.json", lmdm_config()), str(tmp_path / "full.ckpt"),
                       str(full), "--t5", t5_dir]) == 0
  system = conv_load.load(str(out), t5=t5_dir, vae=str(full))
  assert system.codec.sample_rate == SR and system.codec.channels == 2
  assert conv_load.load(str(full)).text is not None  # --t5 recorded at conversion
  # --config saos (random weights, T5 prompts) names the flag too
  from lmdm_jax.sources import SourceError, text_encoder
  from lmdm_jax.config import DiTConfig, load_config
  conf = load_config("saos")
  with pytest.raises(SourceError, match="pass --t5 DIR"):
    text_encoder(conf, DiTConfig.from_config(conf.model))


def test_export_of_own_models_loads_in_stable_audio_tools(tmp_path):
  """A bundle .npz of a base-geometry model exports to a checkpoint that stable-audio-tools'
  factory builds and loads strictly; a streaming bundle round-trips bit for bit."""
  from safetensors.torch import load_file
  from stable_audio_tools.models.factory import create_model_from_config

  from lmdm_jax import bundle
  from lmdm_jax.config import DiTConfig
  from lmdm_jax.nn.dit import DiT
  base = DiTConfig(io_channels=8, embed_dim=64, depth=2, num_heads=2, cond_token_dim=32,
                   global_cond_dim=0, input_add_dim=0, global_token="prepend",
                   timestep_features_dim=32, chunk=8)
  lmdm = DiTConfig(io_channels=8, embed_dim=64, depth=2, num_heads=2, cond_token_dim=32,
                   global_cond_dim=0, input_add_dim=1 + 8 + 5, timestep_features_dim=32, chunk=8,
                   rope_base=1_000_000.0)
  for name, cfg in (("base", base), ("lmdm", lmdm)):
    model = DiT(cfg, rngs=nnx.Rngs(3))
    path = bundle.save_bundle(model, str(tmp_path / f"{name}.npz"), {"config": "tiny"},
                              dtype=np.float32)
    exp = tmp_path / f"exp_{name}"
    assert conv_export.main([path, str(exp)]) == 0
    mc = json.loads((exp / "model_config.json").read_text())
    again = conv.convert_checkpoint(mc, str(exp / "model.safetensors"))
    assert again.config == cfg
    assert_same(again.model, bundle.load_bundle(path)[1])
    if name == "base":
      torch_model = create_model_from_config(mc)
      sd = load_file(str(exp / "model.safetensors"))
      torch_model.load_state_dict(sd, strict=True)
  assert conv_export.main([path, str(exp)]) == 2  # no silent overwrite
  # a train.py work directory (config.json + orbax checkpoints/): its latest step exports too
  import dataclasses

  from lmdm_jax.training.checkpoints import Checkpointer
  from lmdm_jax.training.stage1 import Stage1, Stage1Config
  work = tmp_path / "run"
  work.mkdir()
  write_json(work / "config.json", {"config": "tiny", "model": dataclasses.asdict(lmdm),
                                    "train": {"stage1": {}}, "seed": 0})
  model = DiT(lmdm, rngs=nnx.Rngs(4))
  ck = Checkpointer(str(work / "checkpoints"))
  ck.save(7, Stage1(model, Stage1Config()).init_state(model))
  ck.close()
  assert conv_export.main([str(work), str(tmp_path / "exp_run")]) == 0
  again = conv.convert_checkpoint(
      json.loads((tmp_path / "exp_run" / "model_config.json").read_text()),
      str(tmp_path / "exp_run" / "model.safetensors"))
  assert again.config == lmdm
  assert_same(again.model, model)
