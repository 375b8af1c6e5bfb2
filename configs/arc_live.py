"""`arc_live`: ARC-Forcing post-training of the `live` model, as `arc_demo` is of `demo`.

The model, sampler and conditioner are `live`'s (the base comes from a `train.py --config live`
work directory); the adapter, discriminator head, losses and optimizer are `arc_demo`'s (rank-16
LoRA on the six projections of every block, a 4-step schedule with k ~ U{1..4}, discriminator
features after block 3 of 6, lr 5e-5 for G and D, w_contrastive 0.5; how those were found:
docs/TRAINING.md, "How arc_demo's settings were found").

One change: rollouts of 20 blocks (7.4 s) after the K = 17 real context chunks, instead of 12.
ARC-Forcing trains a model on its own rollouts so that it keeps going on its own output; with
`live`'s 6.3-s context a rollout of 12 blocks would never leave the real context (every block
would still see at least 6 real chunks), so the last blocks of a rollout would not show what a
long stream shows. 20 blocks is the context plus 3 (one `demo` context): blocks 17-19 see only
generated chunks, and the base's first ~12 blocks of drift (the reason for `arc_demo`'s 12) stay
inside. A training item is (17 + 20) x 16 = 592 frames (13.7 s). A step is 2.3x `arc_demo`'s
model FLOPs at batch 4 (G 269 against 114 GFLOP, D 199 against 87; bench/train_throughput.py's
count: the 17-chunk ring, the longer rollout and a 592-frame discriminator pass against 240), so
if time follows FLOPs the 800 steps take about 45 minutes on these 2 cores (`arc_demo`: 19).
The shortest rollout that leaves the context, `--config.arc.rollout_blocks=18`, saves only 8%
(G 248 GFLOP): most of the cost is the context, not the extra blocks.
"""
from lmdm_jax.config import load_config


def get_config():
  c = load_config("live")
  arc = load_config("arc_demo")
  c.name = "arc_live"
  c.sampler.steps = arc.sampler.steps  # 4: the schedule the adapter is trained on
  for section in ("adapter", "head", "arc", "arc_train", "disc_backbone"):
    c[section] = arc[section]
  c.arc.rollout_blocks = 20
  return c
