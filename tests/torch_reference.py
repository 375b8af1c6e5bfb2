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
