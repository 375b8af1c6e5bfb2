#!/usr/bin/env bash
# Installs what the PyTorch parity tests (tests/test_oobleck_parity.py, tests/test_t5_parity.py,
# tests/test_dit_parity.py) and bench/torch_baseline.py
# need, on top of requirements.txt. Idempotent: re-running only checks what is there.
#   PYTHON=/path/to/python scripts/install_test_deps.sh   (default: python3)
#
# torch is pinned to the CPU build (2.13.0); every pip call carries the pin as a constraint so
# no other package can pull in an unpinned (multi-GB CUDA) torch.
set -euo pipefail

PY="${PYTHON:-python3}"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==2.13.0" > "$CONSTRAINTS"
pip_install() { "$PY" -m pip install -q -c "$CONSTRAINTS" "$@"; }

pip_install "torch==2.13.0" pytest "setuptools>=68"  # setuptools: tests/test_install.py builds offline

# The reference implementation. Its declared deps pin an old torch and dozens of training
# packages, so it goes in without them and we add what the imported modules really use.
pip_install --no-deps --ignore-requires-python "stable-audio-tools==0.0.20"

# Imported at module level by stable_audio_tools.models.{autoencoders,blocks,bottleneck,
# transformer,wavelets,utils,pretrained,adp} and inference.{sampling,k_diffusion}.
# (torchaudio and pytorch_lightning are imported too but only for unused classes; the tests
# stub them: see tests/torch_reference.py.)
pip_install einops einops-exts alias-free-torch PyWavelets torchsde tqdm scipy packaging \
  safetensors huggingface_hub

# T5 reference (transformers.T5EncoderModel) and the tokenizers our loader reads.
pip_install "transformers>=4.40" tokenizers sentencepiece

"$PY" - <<'EOF'
import torch, einops, transformers, tokenizers, sentencepiece, safetensors, stable_audio_tools
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("test deps ok: torch", torch.__version__, "transformers", transformers.__version__)
EOF
