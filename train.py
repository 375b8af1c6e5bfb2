"""Stage-1 training (also `lmdm train`); the code is lmdm_jax/apps/train_cli.py, see its --help."""
import sys

from lmdm_jax.apps.train_cli import main

if __name__ == "__main__":
  sys.exit(main())
