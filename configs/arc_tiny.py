"""`arc_tiny`: ARC-Forcing post-training of the `tiny` model (tests and CPU smoke runs).

The model, sampler and conditioner are `tiny`'s (a base checkpoint written by
`train.py --config tiny` loads into it). The ARC settings follow LMDM_REFERENCE §4 (lr 1e-6,
betas .9/.95, wd .01, clip 1.0, loss weights 1/1/2, p_uncond .25, p_partial .1, k ~ U{1..5} of a
6-step schedule), scaled down: 3 rollout blocks, features after block 1 of 2, a small head.
get_config("fast") raises the learning rates so a few hundred CPU steps visibly move the adapter.
"""
from lmdm_jax.config import load_config


def get_config(arg: str = ""):
  c = load_config("tiny:block_causal")
  c.name = "arc_tiny"
  c.adapter = dict(rank=8, alpha=8.0,
                   projections=("self_attn.to_qkv", "self_attn.to_out", "cross_attn.to_q",
                                "cross_attn.to_kv", "ff_in", "ff_out"), layers=None)
  c.head = dict(channels=16, c_mults=(1, 2), strides=(1, 2), num_blocks=(1, 1))
  fast = arg == "fast"
  c.arc = dict(rollout_blocks=3, steps=6, max_k=5, p_uncond=0.25, p_partial=0.1, p_cfg=0.1,
               disc_exit_layer=1, disc_noise="logsnr_uniform",
               lr_g=1e-3 if fast else 1e-6, lr_d=1e-3 if fast else 1e-6, b1=0.9, b2=0.95,
               eps=1e-8, weight_decay=0.01, clip_norm=1.0, w_g=1.0, w_d=1.0, w_contrastive=2.0,
               remat=True)
  c.arc_train = dict(batch_size=2, steps=20, ckpt_every=10, keep=3, log_every=1)
  # Discriminator backbone: None = the generator's frozen base weights (adapter off); or a config
  # spec (e.g. "saos:base") whose weights come from --disc_ckpt.
  c.disc_backbone = None
  return c
