"""`python3 -m lmdm_jax COMMAND ...`: the `lmdm` command (lmdm_jax/apps/cli.py)."""
from lmdm_jax.apps.cli import entry

if __name__ == "__main__":
  entry()
