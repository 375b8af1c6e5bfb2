"""ARC-Forcing post-training (also `lmdm arc`); the code is lmdm_jax/apps/arc_cli.py, see --help."""
import sys

from lmdm_jax.apps.arc_cli import main

if __name__ == "__main__":
  sys.exit(main())
