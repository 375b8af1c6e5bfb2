"""`saos`: the paper's scale, Stable Audio Open Small + the LMDM input projection (340.95M).

D 1024, depth 16, 8 heads, 64 latent channels, 48-frame chunks; the noisy chunk sees K = 3 clean
context chunks (as the reference's target does); the enc-dec window holds 4 chunks = 192 frames.
get_config("block_causal") (default) or get_config("enc_dec"); get_config("base") is SAO-small
itself (global token prepended, no input_add), e.g. for the ARC discriminator backbone.
"""
import ml_collections


def get_config(regime: str = "block_causal"):
  c = ml_collections.ConfigDict()
  c.name = "saos"
  base = regime == "base"
  c.model = ml_collections.ConfigDict(dict(
      io_channels=64, embed_dim=1024, depth=16, num_heads=8,
      cond_token_dim=768, project_cond_tokens=True, global_cond_dim=768,
      input_add_dim=0 if base else 65, global_token="prepend" if base else "postpend",
      qk_norm="ln", rope_base=1_000_000.0 if not base else 10000.0, ff_mult=4,
      timestep_features_dim=256, chunk=48, context_chunks=3, window_chunks=4,
      dtype="float32", param_dtype="float32"))
  c.sampler = ml_collections.ConfigDict(dict(
      regime="block_causal" if base else regime, steps=8, cfg_scale=0.95, plus_plus=True,
      pingpong=True))
  c.conditioner = ml_collections.ConfigDict(dict(type="t5", max_tokens=64))
  c.seed = 0
  return c
