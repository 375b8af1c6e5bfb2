"""The `lmdm` command: every job of the package behind one name (installed by `pip install .`;
`python3 -m lmdm_jax` is the same).

  lmdm sample [...]    text-to-music into a WAV, streamed block by block (= python3 sample.py)
  lmdm jam [...]       jam along with an audio file: the model plays an accompaniment
  lmdm serve [...]     the jam web page and its WebSocket server (microphone in, model out)
  lmdm train [...]     stage-1 training of a model (= python3 train.py)
  lmdm arc [...]       ARC-Forcing post-training of a trained model (= python3 arc.py)
  lmdm convert [...]   a stable-audio-tools / LMDM checkpoint -> a folder sample can load
  lmdm export [...]    any of our models -> a stable-audio-tools checkpoint (safetensors + config)
  lmdm bundle [...]    a train/arc work directory -> a one-file model bundle (.npz)

`lmdm COMMAND --help` describes each command's flags and their defaults. The commands keep JAX's
compiled programs in ~/.cache/lmdm_jax/jax ($LMDM_COMPILE_CACHE) so the second run starts fast;
LMDM_NO_COMPILE_CACHE=1 turns that off.
"""
from __future__ import annotations

import importlib
import signal
import sys

# command -> the module whose main(argv) runs it (returns an exit status, or None for 0)
COMMANDS = {
    "sample": "lmdm_jax.apps.sample_cli",
    "jam": "lmdm_jax.apps.jam",
    "serve": "lmdm_jax.apps.server",
    "train": "lmdm_jax.apps.train_cli",
    "arc": "lmdm_jax.apps.arc_cli",
    "convert": "lmdm_jax.convert.__main__",
    "export": "lmdm_jax.convert.export",
    "bundle": "lmdm_jax.bundle",
}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(__doc__.strip())
    return 0 if argv else 2
  cmd, rest = argv[0], argv[1:]
  if cmd not in COMMANDS:
    print(f"lmdm: error: unknown command {cmd!r}; one of: {', '.join(COMMANDS)} "
          "(lmdm --help describes them)", file=sys.stderr)
    return 2
  if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:  # background shells ignore SIGINT
    signal.signal(signal.SIGINT, signal.default_int_handler)
  sys.argv[0] = f"lmdm {cmd}"  # argparse's prog: usage lines read "lmdm sample ..."
  rc = importlib.import_module(COMMANDS[cmd]).main(rest)
  return 0 if rc is None else int(rc)


def entry():
  sys.exit(main())


if __name__ == "__main__":
  entry()
