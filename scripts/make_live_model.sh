#!/usr/bin/env bash
# How the `live` model (6.3 s of context, trained in the authors' positions, on recorded music and
# a wide-timbre rendered corpus) is made, end to end. Every stage is resumable: rerun the script
# after an interruption (or in a later sitting) and it continues where it stopped; a stage that is
# done costs nothing. The bundled default is still `demo` until a `live` model beats it on
# bench/music_eval.py (docs/RESULTS.md says where the run stands).
#   DATA=data_cache RUNS=runs STEPS=20000 ARC_STEPS=800 bash scripts/make_live_model.sh
# STOP_AFTER=data|stage1|arc stops after that stage (e.g. to build the data on one machine).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data_cache}
RUNS=${RUNS:-runs}
CODEC=${CODEC:-spectral}
STEPS=${STEPS:-20000}
ARC_STEPS=${ARC_STEPS:-800}
HOURS=${HOURS:-3}
STOP_AFTER=${STOP_AFTER:-}

# 1. recorded music from the nine free Debian packages (licences, captions, whole-work hold-out)
[ -f "$DATA/recorded/report.json" ] || python3 -m lmdm_jax.data.recorded --out "$DATA/recorded"
python3 -m lmdm_jax.data.dataset --audio "$DATA/recorded/audio" --out "$DATA/latents_recorded" \
  --codec "$CODEC" --quiet
# 2. the wide-timbre rendered corpus (synth leads and pads, electric instruments, drums) with
#    stems, its latents and the stems' melody tracks (the sketch channels)
[ -f "$DATA/corpus_wide/corpus_stats.json" ] || python3 -m lmdm_jax.data.corpus \
  --out "$DATA/corpus_wide" --hours "$HOURS" --timbres wide --mono --sample-rate 22050 --quiet
python3 -m lmdm_jax.data.dataset --audio "$DATA/corpus_wide" --out "$DATA/latents_wide" \
  --codec "$CODEC" --quiet
[ -f "$DATA/latents_wide/melody.npz" ] || \
  python3 -m lmdm_jax.data.melody "$DATA/latents_wide" --audio "$DATA/corpus_wide"
[ "$STOP_AFTER" = data ] && exit 0

MIX="$DATA/latents_recorded:0.5,$DATA/latents_wide:0.5"
# 3. stage 1 in the authors' positions, with the stream's zero-context start (p_start)
python3 train.py --config live --data "$MIX" --workdir "$RUNS/live" --config.train.steps="$STEPS"
python3 -m lmdm_jax.bundle "$RUNS/live" --out "$RUNS/live_base.npz"
[ "$STOP_AFTER" = stage1 ] && exit 0
# 4. ARC-Forcing on the frozen stage-1 model (rollouts past the 17-chunk context)
python3 arc.py --config arc_live --base "$RUNS/live" --data "$MIX" --workdir "$RUNS/arc_live" \
  --config.arc_train.steps="$ARC_STEPS"
python3 -m lmdm_jax.bundle --arc "$RUNS/arc_live" --out "$RUNS/live_model.npz"
[ "$STOP_AFTER" = arc ] && exit 0
# 5. the targets table: the shipped model against the new one, held-out prompts and recordings
python3 bench/music_eval.py --checkpoint prev=lmdm_jax/assets/demo_model.npz \
  --checkpoint live="$RUNS/live_model.npz" --recorded "$DATA/latents_recorded" \
  --data "$DATA/latents_wide" --out "$RUNS/music_eval_live"
