"""`tiny`: a small random LMDM model for tests and CPU smoke runs (seconds on CPU).

get_config("block_causal") (default) or get_config("enc_dec") picks the streaming regime.
head_dim 64 keeps the rotary embedding partial (32 of 64 dims), as in SAO-small.
"""
import ml_collections


def get_config(regime: str = "block_causal"):
  c = ml_collections.ConfigDict()
  c.name = "tiny"
  c.model = ml_collections.ConfigDict(dict(
      io_channels=8, embed_dim=128, depth=2, num_heads=2,
      cond_token_dim=32, project_cond_tokens=True, global_cond_dim=32,
      input_add_dim=1 + 8, global_token="postpend", qk_norm="ln", rope_base=10000.0,
      ff_mult=4, timestep_features_dim=32,
      chunk=4, context_chunks=3, window_chunks=4,
      dtype="float32", param_dtype="float32"))
  c.sampler = ml_collections.ConfigDict(dict(
      regime=regime, steps=8, cfg_scale=3.0, plus_plus=False, pingpong=True))
  c.conditioner = ml_collections.ConfigDict(dict(type="bytes", max_tokens=16))
  c.seed = 0
  c.train = _train()
  return c


def _train():
  import ml_collections as mc
  return mc.ConfigDict(dict(batch_size=4, steps=200, ckpt_every=50, keep=3, log_every=10,
                            eval_every=50, eval_batches=2, fsdp=1,
                            stage1=dict(chunks=6, lr=1e-3, warmup_steps=10, clip_norm=1.0)))
