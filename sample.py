"""Text-to-music (also `lmdm sample`); the code is lmdm_jax/apps/sample_cli.py, see its --help."""
from lmdm_jax.apps.sample_cli import entry

if __name__ == "__main__":
  entry()
