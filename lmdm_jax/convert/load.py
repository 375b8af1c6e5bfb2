"""Everything sampling needs from a converted checkpoint (``python3 -m lmdm_jax.convert``).

``load(path, t5=None, vae=None)`` -> ``ConvertedSystem``: the DiT, the conditioning (its number
conditioners, e.g. ``seconds_total``, and how their tokens join the prompt's), the T5 prompt
encoder, the codec (the Oobleck VAE) and the sampler defaults. Where each piece comes from:
- T5: ``t5`` (a local Hugging Face T5 folder; ``sample.py --t5 DIR``), else the folder recorded
  at conversion (``--t5``), else the config's ``model_path`` when it is a local folder;
- codec: ``vae`` (a converted directory holding a VAE, or a stable-audio-tools VAE
  ``.safetensors``/``.ckpt``; ``sample.py --vae PATH``), else the checkpoint's own VAE (its
  ``pretransform.*`` keys), else the VAE recorded at conversion (``--vae``).
Everything missing or unsupported is checked before any weight is read and reported in ONE
``NotSampleable`` error that names each missing piece and the flag that supplies it.

Sampler defaults (``ConvertedSystem.sampler``):
- a streaming model (input_add channels, LMDM): the regime of its training mask
  (``context_router_attention_pattern``: ``block-causal`` -> ``block_causal``, else
  ``enc_dec``), 8 pingpong steps, CFG++ at 0.95, seconds_start 0, seconds_total 12 (the
  authors' inference notebook);
- a base model (no input_add, e.g. SAO-small itself): regime ``clip`` (the whole clip denoised at
  once, ``lmdm_jax.clip_sampling``), 8 pingpong steps, no CFG (scale 1), seconds_start 0 and
  seconds_total the clip's length (``seconds_total=None`` here).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from lmdm_jax.config import DiTConfig
from lmdm_jax.convert import dit as conv
from lmdm_jax.nn.conditioners import Conditioning

SECONDS_START, SECONDS_TOTAL = "seconds_start", "seconds_total"
STREAM_SECONDS_TOTAL = 12.0  # the authors' inference notebook conditions streams on 12 s
RECTIFIED_FLOW = ("rectified_flow", "rf_denoiser")
T5_HELP = ("a local Hugging Face T5 folder (config.json, model.safetensors or pytorch_model.bin, "
           "tokenizer.json or spiece.model); nothing is downloaded")
VAE_HELP = ("a converted directory that holds a VAE, or a stable-audio-tools VAE "
            ".safetensors/.ckpt")


class NotSampleable(ValueError):
  """A converted checkpoint lacks something sampling needs; the message names each piece and the
  flag that supplies it."""


@dataclasses.dataclass
class ConvertedSystem:
  """What ``load`` returns; ``condition`` turns prompts into the model's conditioning."""

  path: str
  cfg: DiTConfig
  model: Any  # lmdm_jax.nn.dit.DiT
  conditioning: Conditioning
  text_id: str | None  # id of the T5 prompt conditioner (None: the model reads no prompt)
  text_spec: dict | None  # {"type": "t5", "t5_model_name", "max_length", "path"} or None
  text: Any  # lmdm_jax.text.TextEncoder or None
  codec: Any  # lmdm_jax.codecs.Codec or None
  sampler: dict  # regime, steps, cfg_scale, plus_plus, pingpong, seconds_start, seconds_total
  sample_rate: int
  model_config: dict

  @property
  def cross_len(self) -> int:
    """Cross-attention tokens per prompt (T5 tokens + one per number in the cross ids)."""
    n = self.conditioning.cross_len(self.text.max_tokens if self.text is not None else 0)
    return max(n, 1)

  def condition(self, prompts: Sequence[str], seconds_total: float | None = None,
                seconds_start: float | None = None):
    """-> (cross tokens (B, cross_len, cond_token_dim), global (B, global_cond_dim) or None) as
    float32 numpy arrays. The seconds default to ``sampler`` (seconds_total must be given for a
    base model: the clip's length)."""
    if isinstance(prompts, str):
      raise TypeError("prompts must be a list of strings, not one string")
    b = len(prompts)
    if seconds_total is None:
      seconds_total = self.sampler["seconds_total"]
    if seconds_total is None:
      raise ValueError("seconds_total is needed (the clip's length in seconds)")
    start = self.sampler["seconds_start"] if seconds_start is None else seconds_start
    text = {}
    if self.text_id is not None:
      text[self.text_id] = self.text(list(prompts))
    cross, glob = self.conditioning(text, {SECONDS_START: start, SECONDS_TOTAL: seconds_total}, b)
    if cross is None:
      cross = np.zeros((b, 1, self.cfg.cond_token_dim), np.float32)
    return np.asarray(cross, np.float32), None if glob is None else np.asarray(glob, np.float32)


def sampler_defaults(cfg: DiTConfig, model_config: dict) -> dict:
  """See the module docstring."""
  if not cfg.streaming:
    return dict(regime="clip", steps=8, cfg_scale=1.0, plus_plus=False, pingpong=True,
                seconds_start=0.0, seconds_total=None)
  mk = (((model_config.get("training") or {}).get("inpainting") or {}).get("mask_kwargs") or {})
  pattern = mk.get("context_router_attention_pattern", "enc-dec")
  return dict(regime="block_causal" if pattern == "block-causal" else "enc_dec", steps=8,
              cfg_scale=0.95, plus_plus=True, pingpong=True, seconds_start=0.0,
              seconds_total=STREAM_SECONDS_TOTAL)


def _t5_dir(spec_text: dict, t5: str | None, recorded: str | None):
  """(folder or None, why not) for the T5 prompt encoder."""
  if t5:
    return (t5, None) if os.path.isdir(t5) else (None, f"--t5 {t5!r} is not a folder")
  if recorded:
    if os.path.isdir(recorded):
      return recorded, None
    return None, f"the T5 folder recorded at conversion ({recorded}) is gone"
  mp = spec_text.get("model_path")
  if mp and os.path.isdir(mp):
    return mp, None
  return None, "no T5 folder was given"


def _problems(meta: dict, cfg: DiTConfig, t5: str | None, vae: str | None, want_text: bool,
              want_codec: bool):
  """-> (list of problems, T5 folder, codec source) without reading weights."""
  problems = []
  mc = meta["model_config"]
  spec = meta["conditioning"]
  objective = ((mc.get("model") or {}).get("diffusion") or {}).get("diffusion_objective", "v")
  if objective not in RECTIFIED_FLOW:
    problems.append(f"its diffusion objective is {objective!r}; this port samples rectified-flow "
                    f"models only ({' / '.join(RECTIFIED_FLOW)})")
  used = spec["cross_ids"] + spec["global_ids"]
  bad = sorted({f"{i} ({spec['unsupported'][i]})" for i in used if i in spec["unsupported"]})
  bad += sorted({i for i in used if i in spec["numbers"] and i not in (SECONDS_START, SECONDS_TOTAL)})
  if bad:
    problems.append(f"it is conditioned on {bad}, which this port cannot compute (supported: a "
                    f"T5 prompt, {SECONDS_START}, {SECONDS_TOTAL})")
  text_ids = [i for i in spec["text"] if i in spec["cross_ids"]]
  if len(text_ids) > 1:
    problems.append(f"it has several T5 conditioners {text_ids}; only one prompt is supported")
  if spec["cross_ids"] and spec["cond_dim"] != cfg.cond_token_dim:
    problems.append(f"its conditioners give {spec['cond_dim']}-wide tokens but the DiT reads "
                    f"cond_token_dim {cfg.cond_token_dim}")
  gdim = sum(spec["numbers"][i]["output_dim"] for i in spec["global_ids"] if i in spec["numbers"])
  if gdim != cfg.global_cond_dim and not bad:
    problems.append(f"its global conditioners {spec['global_ids']} give {gdim} values but the "
                    f"DiT reads global_cond_dim {cfg.global_cond_dim}")
  t5_dir = None
  if want_text and text_ids:
    entry = spec["text"][text_ids[0]]
    t5_dir, why = _t5_dir(entry, t5, meta.get("t5_dir"))
    if t5_dir is None:
      problems.append(f"the prompt encoder {entry['t5_model_name']!r} ({why}): pass --t5 DIR, "
                      f"{T5_HELP}")
  codec = None
  if want_codec:
    if vae:
      codec = {"source": "vae", "path": vae}
      if not os.path.exists(vae):
        problems.append(f"the VAE: --vae {vae!r} does not exist")
    elif meta.get("pretransform") is not None:
      codec = {"source": "pretransform"}
    elif meta.get("codec") and meta["codec"].get("source") == "vae":
      codec = meta["codec"]
      if not os.path.exists(codec["path"]):
        problems.append(f"the VAE recorded at conversion ({codec['path']}) is gone: pass "
                        f"--vae PATH, {VAE_HELP}")
    else:
      problems.append("the VAE that decodes latents to audio (the checkpoint had no "
                      f"pretransform.* keys): pass --vae PATH, {VAE_HELP}; or --codec none to "
                      "write latents")
  return problems, t5_dir, codec


def _codec(path: str, meta: dict, source: dict, cfg: DiTConfig, sample_rate: int):
  from lmdm_jax.codecs.oobleck import OobleckCodec
  from lmdm_jax.nn.oobleck import STABLE_AUDIO_OPEN_VAE
  if source["source"] == "pretransform":
    vae = conv.load_converted_pretransform(path)
    codec = OobleckCodec(vae, sample_rate)
  elif os.path.isdir(source["path"]):
    vae = conv.load_converted_pretransform(source["path"])
    if vae is None:
      raise NotSampleable(f"--vae {source['path']!r}: this converted directory holds no VAE")
    codec = OobleckCodec(vae, sample_rate)
  else:
    pt = (meta["model_config"].get("model") or {}).get("pretransform") or STABLE_AUDIO_OPEN_VAE
    codec = OobleckCodec.from_checkpoint(source["path"], pt, sample_rate)
  if codec.latent_dim != cfg.io_channels:
    raise NotSampleable(f"the VAE has {codec.latent_dim}-dim latents but the DiT has "
                        f"io_channels {cfg.io_channels}: pass the matching --vae PATH")
  return codec


def read_meta(path: str) -> dict:
  """The converter's record of ``path``; raises ValueError for a directory from a converter too
  old to record the model config."""
  meta = conv._read_meta(path)
  if "model_config" not in meta or "conditioning" not in meta:
    raise ValueError(f"{path!r} was converted without a record of its model config; convert it "
                     "again (python3 -m lmdm_jax.convert CONFIG CHECKPOINT OUT_DIR)")
  return meta


def load(path: str, *, t5: str | None = None, vae: str | None = None, text: bool = True,
         codec: bool = True) -> ConvertedSystem:
  """A converted checkpoint directory -> ``ConvertedSystem`` (see the module docstring).
  ``text=False`` / ``codec=False`` skip the prompt encoder / the VAE (e.g. ``--codec none``).
  Raises ``NotSampleable`` naming every missing piece and its flag."""
  from lmdm_jax import text as text_lib
  path = os.path.abspath(path)
  meta = read_meta(path)
  cfg = DiTConfig.from_stored(meta["dit"])
  problems, t5_dir, codec_src = _problems(meta, cfg, t5, vae, text, codec)
  if problems:
    lines = "\n".join(f"  - {p}" for p in problems)
    raise NotSampleable(f"converted checkpoint {path} cannot sample yet:\n{lines}")
  spec = meta["conditioning"]
  cfg, model, numbers = conv.load_converted(path)
  text_ids = [i for i in spec["text"] if i in spec["cross_ids"]]
  conditioning = Conditioning(numbers, text_ids, spec["cross_ids"], spec["global_ids"])
  enc = None
  if text and text_ids:
    entry = spec["text"][text_ids[0]]
    try:
      enc = text_lib.get_text_encoder("t5", path=t5_dir, max_tokens=entry["max_length"],
                                      dim=spec["cond_dim"])
    except (ValueError, OSError) as e:
      raise NotSampleable(f"the T5 folder {t5_dir} does not fit this checkpoint ({e}): pass the "
                          f"{entry['t5_model_name']!r} folder with --t5 DIR") from e
  sample_rate = int(meta["model_config"].get("sample_rate", 44100))
  cod = _codec(path, meta, codec_src, cfg, sample_rate) if codec_src is not None else None
  text_spec = dict(spec["text"][text_ids[0]], path=t5_dir) if text_ids else None
  return ConvertedSystem(path=path, cfg=cfg, model=model, conditioning=conditioning,
                         text_id=text_ids[0] if (enc is not None) else None, text_spec=text_spec,
                         text=enc, codec=cod,
                         sampler=sampler_defaults(cfg, meta["model_config"]),
                         sample_rate=sample_rate, model_config=meta["model_config"])


def is_converted(path: str) -> bool:
  """Whether ``path`` looks like a converter output directory (its JSON ``config`` item)."""
  return os.path.isdir(path) and os.path.isdir(os.path.join(path, "config"))
