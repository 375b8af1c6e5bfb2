"""`demo`: the CPU-sized model for the bundled default (default codec + MiniLM prompts).

Latents: the weight-free `spectral` codec (22.05 kHz mono, 43.07 frames/s, 192 dims). Prompts:
all-MiniLM-L6-v2 token states (384 wide, up to 32 tokens). 16-frame chunks (0.37 s), K = 3
context chunks. Width 256, depth 6, 4 heads (head_dim 64, rotary on 32 dims): 8,422,976
parameters, sized to stream faster than real time on a 2-core CPU with CFG and decoding. Extra
input_add channels for jamming (accompaniment mask + latents) and sketches (14 pitch features):
the bundled model (lmdm_jax/assets/demo_model.npz) is this config.
"""
import ml_collections


def get_config(regime: str = "block_causal"):
  c = ml_collections.ConfigDict()
  c.name = "demo"
  c.model = ml_collections.ConfigDict(dict(
      io_channels=192, embed_dim=256, depth=6, num_heads=4,
      cond_token_dim=384, project_cond_tokens=True, global_cond_dim=0,
      # input_add: [context mask | context (192) | accompaniment mask | accompaniment (192) |
      # sketch (14)]: one model for text-to-music, sketch-to-music and jamming
      input_add_dim=1 + 192 + (1 + 192) + 14, global_token="postpend", qk_norm="ln", rope_base=10000.0,
      ff_mult=4, timestep_features_dim=128,
      chunk=16, context_chunks=3, window_chunks=4,
      dtype="float32", param_dtype="float32"))
  c.sampler = ml_collections.ConfigDict(dict(
      regime=regime, steps=8, cfg_scale=3.0, plus_plus=False, pingpong=True))
  c.conditioner = ml_collections.ConfigDict(dict(type="minilm", max_tokens=32))
  c.codec = "spectral"
  c.train = ml_collections.ConfigDict(dict(
      batch_size=8, steps=20000, ckpt_every=100, keep=3, log_every=10, eval_every=250,
      eval_batches=4, fsdp=1,
      stage1=dict(chunks=12, lr=4e-4, warmup_steps=200, clip_norm=1.0, weight_decay=0.01,
                  b2=0.99, ema_decay=0.998)))
  c.seed = 0
  return c
