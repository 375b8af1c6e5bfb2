#!/usr/bin/env bash
# How the bundled default model (lmdm_jax/assets/demo_model.npz) is made, end to end, on CPU.
# Every stage is resumable: rerun the script after an interruption and it continues.
# The bundled file is the stage-1 model with its ARC-Forcing adapter merged (4-step sampling).
#   STEPS=3000 ARC_STEPS=800 bash scripts/make_demo_model.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-3000}
ARC_STEPS=${ARC_STEPS:-800}
HOURS=${HOURS:-3}

# 1. real music: music21 scores -> FluidSynth (mixes + aligned stems, captions from metadata)
[ -f data_cache/corpus/corpus_stats.json ] || \
  python3 -m lmdm_jax.data.corpus --out data_cache/corpus --hours "$HOURS"
# 2. latents with the default codec (resumable, deterministic), then melody tracks of the stems
python3 -m lmdm_jax.data.dataset --audio data_cache/corpus --out data_cache/latents_spectral \
  --codec spectral
[ -f data_cache/latents_spectral/melody.npz ] || \
  python3 -m lmdm_jax.data.melody data_cache/latents_spectral --audio data_cache/corpus
# 3. stage 1 (resumes from runs/demo/checkpoints)
python3 train.py --config demo --data data_cache/latents_spectral --workdir runs/demo \
  --config.train.steps="$STEPS"
python3 -m lmdm_jax.bundle runs/demo --out runs/demo_base.npz
# 4. ARC-Forcing on the frozen stage-1 model (resumes from runs/arc_demo)
python3 arc.py --config arc_demo --base runs/demo --data data_cache/latents_spectral \
  --workdir runs/arc_demo --config.arc_train.steps="$ARC_STEPS"
python3 -m lmdm_jax.bundle --arc runs/arc_demo --out lmdm_jax/assets/demo_model.npz
# 5. what they sound like
# (each at its config's steps: the base at 8, the ARC model at 4)
python3 bench/music_eval.py --checkpoint base=runs/demo_base.npz \
  --checkpoint arc=lmdm_jax/assets/demo_model.npz
python3 bench/drift.py --config arc_demo --base runs/demo --arc runs/arc_demo \
  --data data_cache/latents_spectral --codec spectral --seconds 60 --base-steps 8 --cfg-scale 1
