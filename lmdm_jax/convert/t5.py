"""Loads a Hugging Face T5 checkpoint directory (local only) into ``lmdm_jax.nn.t5``.

A directory holds ``config.json``; weights in ``model.safetensors`` (or a sharded
``model.safetensors.index.json``) or ``pytorch_model.bin`` (read with torch); and a tokenizer:
``tokenizer.json`` (read with the ``tokenizers`` package) or else ``spiece.model`` (read with
``sentencepiece``). Nothing is downloaded.

Weights of a full ``T5ForConditionalGeneration`` checkpoint (keys under ``decoder.`` and
``lm_head.``) are not part of the encoder and are ignored by design; any other key the encoder
does not use, and any key it needs that is absent or wrongly shaped, raises a ValueError.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np
from flax import nnx

from lmdm_jax.nn.t5 import T5Conditioner, T5Config, T5Encoder
from lmdm_jax.convert.keys import check_keys

IGNORED_PREFIXES = ("decoder.", "lm_head.")


def _to_numpy(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):
    x = x.detach().cpu().float().numpy()
  return np.asarray(x, np.float32)


def _require_dir(path: str) -> str:
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"T5 directory {path!r} does not exist (only local directories are "
                            "read; nothing is downloaded)")
  return path


def load_config(path: str) -> T5Config:
  """``config.json`` of the directory -> ``T5Config``."""
  cfg_path = os.path.join(_require_dir(path), "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"no config.json in T5 directory {path!r}")
  with open(cfg_path) as f:
    cfg = json.load(f)
  if cfg.get("model_type", "t5") != "t5":
    raise ValueError(f"{cfg_path} is a {cfg.get('model_type')!r} config, not a T5 one")
  return T5Config.from_hf(cfg)


def read_weights(path: str) -> dict[str, np.ndarray]:
  """The directory's state_dict as float32 numpy arrays (safetensors first, then .bin)."""
  path = _require_dir(path)
  st = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  binf = os.path.join(path, "pytorch_model.bin")
  if os.path.isfile(st) or os.path.isfile(index):
    from safetensors.numpy import load_file
    if os.path.isfile(st):
      files = [st]
    else:
      with open(index) as f:
        files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    out: dict[str, np.ndarray] = {}
    for file in files:
      out.update({k: _to_numpy(v) for k, v in load_file(file).items()})
    return out
  if os.path.isfile(binf):
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"{binf} is a PyTorch pickle and needs torch to read; convert it to "
                        "model.safetensors or install torch") from e
    sd = torch.load(binf, map_location="cpu", weights_only=True)
    return {k: _to_numpy(v) for k, v in sd.items()}
  raise FileNotFoundError(f"no T5 weights in {path!r}: expected model.safetensors, "
                          "model.safetensors.index.json or pytorch_model.bin")


def _hf_names(cfg: T5Config) -> dict[str, tuple[tuple[Any, ...], bool]]:
  """HF key -> (Flax parameter path, transpose?) for every encoder parameter."""
  names = {"encoder.final_layer_norm.weight": (("final_norm", "weight"), False),
           "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
             (("rel_bias",), False)}
  ff = ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo")
  for i in range(cfg.num_layers):
    p = f"encoder.block.{i}.layer."
    names[p + "0.layer_norm.weight"] = (("layers", i, "attn_norm", "weight"), False)
    names[p + "1.layer_norm.weight"] = (("layers", i, "ff_norm", "weight"), False)
    for n in "qkvo":
      names[p + f"0.SelfAttention.{n}.weight"] = (("layers", i, n, "kernel"), True)
    for n in ff:
      names[p + f"1.DenseReluDense.{n}.weight"] = (("layers", i, n, "kernel"), True)
  return names


def load_torch_state_dict(model: T5Encoder, state_dict: Mapping[str, Any], *,
                          allow_missing: bool = False,
                          allow_unexpected: bool = False) -> dict[str, list[str]]:
  """Writes a HF T5 state_dict into ``model`` in place (all or nothing).

  The embedding comes from ``shared.weight`` or ``encoder.embed_tokens.weight`` (tied: when both
  are present they must be equal). Returns ``{"missing": [...], "unexpected": [...]}``.
  """
  sd = {k: v for k, v in state_dict.items() if not k.startswith(IGNORED_PREFIXES)}
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  used, missing, bad, updates = set(), [], [], []

  def take(flax_path, key, value):
    var = params[flax_path]
    if value is None:
      missing.append(key)
    elif value.shape != var[...].shape:
      bad.append(f"{key}: got {value.shape}, expected {var[...].shape} (Flax layout)")
    else:
      updates.append((var, value))

  emb_keys = [k for k in ("shared.weight", "encoder.embed_tokens.weight") if k in sd]
  embs = [_to_numpy(sd[k]) for k in emb_keys]
  used.update(emb_keys)
  if len(embs) == 2 and (embs[0].shape != embs[1].shape or not np.array_equal(*embs)):
    bad.append("shared.weight and encoder.embed_tokens.weight differ")
  take(("embed", "embedding"), "shared.weight", embs[0] if embs else None)
  for key, (flax_path, transpose) in _hf_names(model.cfg).items():
    value = _to_numpy(sd[key]) if key in sd else None
    if value is not None:
      used.add(key)
      value = value.T if transpose else value
    take(flax_path, key, value)

  unexpected = sorted(set(sd) - used)
  check_keys("T5 encoder state_dict", bad, missing, unexpected, allow_missing, allow_unexpected,
             bad_label="wrongly shaped or inconsistent keys")
  for var, value in updates:
    var[...] = np.ascontiguousarray(value)
  return {"missing": missing, "unexpected": unexpected}


def load_t5_encoder(path: str) -> T5Encoder:
  """Config + weights of a local HF T5 directory -> ``T5Encoder`` (float32)."""
  cfg = load_config(path)
  weights = read_weights(path)
  model = T5Encoder(cfg, nnx.Rngs(0))
  load_torch_state_dict(model, weights)
  return model


class Tokenizer:
  """prompts -> (ids (B, max_length) int32, mask (B, max_length) bool), padded with ``pad_id``
  and truncated to ``max_length`` tokens including the closing ``</s>``.

  Holds ``encode_one`` (text -> ids, ``</s>`` included), ``pad_id`` and ``max_length``.
  """

  def __init__(self, encode_one, pad_id: int, max_length: int):
    self.encode_one, self.pad_id, self.max_length = encode_one, pad_id, max_length

  def __call__(self, prompts):
    ids = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
    mask = np.zeros((len(prompts), self.max_length), bool)
    for i, text in enumerate(prompts):
      row = self.encode_one(text)[: self.max_length]
      ids[i, : len(row)] = row
      mask[i, : len(row)] = True
    return ids, mask


def load_tokenizer(path: str, max_length: int = 64) -> Tokenizer:
  """``tokenizer.json`` (fast tokenizer, its post-processor adds ``</s>``) or ``spiece.model``
  (sentencepiece ids + ``</s>``, truncated to keep room for it, as HF's T5Tokenizer does)."""
  path = _require_dir(path)
  cfg = load_config(path)
  tj = os.path.join(path, "tokenizer.json")
  sp = os.path.join(path, "spiece.model")
  if os.path.isfile(tj):
    from tokenizers import Tokenizer as HFTokenizer
    tok = HFTokenizer.from_file(tj)
    tok.no_padding()
    tok.enable_truncation(max_length)
    return Tokenizer(lambda text: tok.encode(text).ids, cfg.pad_token_id, max_length)
  if os.path.isfile(sp):
    import sentencepiece
    proc = sentencepiece.SentencePieceProcessor(model_file=sp)
    eos = cfg.eos_token_id
    return Tokenizer(lambda text: proc.encode(text)[: max_length - 1] + [eos], cfg.pad_token_id,
                     max_length)
  raise FileNotFoundError(f"no tokenizer in T5 directory {path!r}: expected tokenizer.json or "
                          "spiece.model")


def load_conditioner(path: str, max_length: int = 64) -> T5Conditioner:
  """Config, weights and tokenizer of a local Hugging Face T5 directory -> ``T5Conditioner``."""
  return T5Conditioner(load_t5_encoder(path), load_tokenizer(path, max_length), max_length)
