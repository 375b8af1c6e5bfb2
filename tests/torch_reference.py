"""Imports of the PyTorch reference code (torch, stable-audio-tools 0.0.20, transformers) for the
parity tests. ``scripts/install_test_deps.sh`` installs all of it.

``require_torch()`` skips a test module only when torch itself is not importable; anything else
missing is a real failure (the install script is supposed to provide it).
"""
from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest


def require_torch():
  """Returns the torch module, or skips the calling test module when torch is absent."""
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the machine
    pytest.skip(f"torch is not importable ({e}); run scripts/install_test_deps.sh",
                allow_module_level=True)
  torch.set_num_threads(1)
  return torch


def _stub_module(name: str) -> types.ModuleType:
  """An empty module registered under ``name``. It has a spec (``importlib.util.find_spec`` on a
  module without one raises, and transformers probes torchaudio that way) but no version or file,
  so such probes read the package as absent."""
  mod = types.ModuleType(name)
  mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
  sys.modules[name] = mod
  return mod


def _stub_torchaudio():
  """stable-audio-tools imports ``torchaudio.transforms`` at module level (autoencoders.py,
  pretransforms.py, data/utils.py, inference/utils.py) but the Oobleck code never calls it. The
  torchaudio build on the registry here is a CUDA one that does not match torch 2.13.0+cpu, so
  a stub stands in; any use of it raises."""
  if "torchaudio" in sys.modules:
    return
  try:
    import torchaudio  # noqa: F401  (a real, working install wins)
    return
  except Exception:  # noqa: BLE001 - an absent or broken build both mean: stub it
    pass

  class _Unavailable:
    def __init__(self, *args, **kwargs):
      raise RuntimeError("torchaudio is stubbed in the parity tests")

  ta, tat = _stub_module("torchaudio"), _stub_module("torchaudio.transforms")
  tat.Resample = tat.MelSpectrogram = _Unavailable
  ta.transforms = tat


def _stub_pytorch_lightning():
  """``stable_audio_tools.models.lora.callbacks`` (reached from autoencoders.py via dit.py)
  subclasses ``pl.Callback`` and ``pl.callbacks.ModelCheckpoint`` at import time. Lightning is a
  large training framework the parity tests never use, so two empty base classes stand in."""
  if "pytorch_lightning" in sys.modules:
    return
  try:
    import pytorch_lightning  # noqa: F401
    return
  except Exception:  # noqa: BLE001
    pass

  class Callback:
    pass

  class ModelCheckpoint(Callback):
    pass

  pl, plc = _stub_module("pytorch_lightning"), _stub_module("pytorch_lightning.callbacks")
  pl.Callback = plc.Callback = Callback
  plc.ModelCheckpoint = ModelCheckpoint
  pl.callbacks = plc


def stable_audio_tools():
  """Returns a namespace with the reference ``OobleckEncoder``, ``OobleckDecoder``,
  ``create_pretransform_from_config`` and ``VAEBottleneck`` (stable-audio-tools 0.0.20)."""
  require_torch()
  _stub_torchaudio()
  _stub_pytorch_lightning()
  from stable_audio_tools.models import autoencoders, bottleneck, factory
  return types.SimpleNamespace(
    OobleckEncoder=autoencoders.OobleckEncoder, OobleckDecoder=autoencoders.OobleckDecoder,
    create_pretransform_from_config=factory.create_pretransform_from_config,
    VAEBottleneck=bottleneck.VAEBottleneck)


def transformers():
  """Returns the ``transformers`` module (quiet), after making sure torch is there."""
  require_torch()
  import transformers as tf
  tf.logging.set_verbosity_error()
  return tf


def dit_modules():
  """Returns a namespace with the reference ``DiffusionTransformer`` and ``NumberConditioner``
  (stable-audio-tools 0.0.20) and ``LMDMDiffusionTransformer`` (below)."""
  require_torch()
  _stub_torchaudio()
  _stub_pytorch_lightning()
  from stable_audio_tools.models import conditioners, dit
  return types.SimpleNamespace(DiffusionTransformer=dit.DiffusionTransformer,
                               NumberConditioner=conditioners.NumberConditioner,
                               LMDMDiffusionTransformer=_lmdm_class(dit.DiffusionTransformer))


def _lmdm_class(base):
  """The LMDM changes to the DiT on top of the 0.0.20 modules.

  This is a re-implementation from LMDM_REFERENCE.md §1.3-§1.5 (the specification), NOT the
  authors' code: the fork (live-music-diffusion-models) is not on PyPI. Everything except the
  LMDM-specific steps is the 0.0.20 code itself: the embedders, the transformer blocks
  (``TransformerBlock.forward``: qk-LayerNorm, rotary, cross-attention, SwiGLU), ``project_in/out``
  and the residual 1x1 convs. The LMDM steps added here:
    - ``to_input_add_embed`` (Linear, no bias) of the input_add channels, added after
      ``project_in`` (§1.3 step 4, 10);
    - the context router mask r: x <- x * r before and after ``project_in`` (§1.3 steps 8, 10);
    - postpend: the global token gamma = g' + tau last, rotary table for positions 0..T rolled by
      -1 (frame i at i+1, the global token at 0) (§1.3 steps 11, 12);
    - an explicit boolean self-attention mask (§1.5), applied with SDPA instead of FlexAttention
      (same numbers; flex would try to compile on CPU).
  """
  import torch
  import torch.nn.functional as F
  from torch import nn

  class LMDMDiffusionTransformer(base):

    def __init__(self, *, input_add_dim: int = 0, postpend: bool = True, **kwargs):
      super().__init__(**kwargs)
      embed_dim = kwargs["embed_dim"]
      self.postpend = postpend
      if input_add_dim:
        self.to_input_add_embed = nn.Linear(input_add_dim, embed_dim, bias=False)
      self._self_attn_mask = None
      for layer in self.transformer.layers:
        layer.self_attn.apply_attn = self._masked_attention

    def _masked_attention(self, q, k, v, **unused):
      return F.scaled_dot_product_attention(q, k, v, attn_mask=self._self_attn_mask)

    def lmdm_forward(self, x, t, cross_attn_cond=None, global_embed=None, input_add_cond=None,
                     context_router_mask=None, self_attn_mask=None, exit_layer_ix=None):
      """x (B, C, T); t (B,); cross_attn_cond (B, S, Dc); global_embed (B, Dg);
      input_add_cond (B, A, T); context_router_mask r (B, 1, T); self_attn_mask bool (T+1, T+1)
      over the token order of the model (True = may attend)."""
      c = self.to_cond_embed(cross_attn_cond) if cross_attn_cond is not None else None
      g = self.to_global_embed(global_embed) if global_embed is not None else None
      add = (self.to_input_add_embed(input_add_cond.transpose(1, 2))
             if input_add_cond is not None else None)
      tau = self.to_timestep_embed(self.timestep_features(t[:, None]))
      gamma = (tau if g is None else g + tau).unsqueeze(1)
      x = self.preprocess_conv(x) + x
      if context_router_mask is not None:
        x = x * context_router_mask
      h = self.transformer.project_in(x.transpose(1, 2))
      if context_router_mask is not None:
        h = h * context_router_mask.transpose(1, 2)
      if add is not None:
        h = h + add
      n = h.shape[1]
      h = torch.cat([h, gamma], 1) if self.postpend else torch.cat([gamma, h], 1)
      freqs, _ = self.transformer.rotary_pos_emb.forward_from_seq_len(n + 1)
      if self.postpend:
        freqs = torch.roll(freqs, -1, dims=0)
      self._self_attn_mask = self_attn_mask
      try:
        for i, layer in enumerate(self.transformer.layers):
          h = layer(h, context=c, rotary_pos_emb=(freqs, 1.0))
          if exit_layer_ix is not None and i == exit_layer_ix:
            return h
      finally:
        self._self_attn_mask = None
      out = self.transformer.project_out(h)
      out = (out[:, :-1] if self.postpend else out[:, 1:]).transpose(1, 2)
      return self.postprocess_conv(out) + out

  return LMDMDiffusionTransformer
