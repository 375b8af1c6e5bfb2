"""`live`: the successor of `demo` for the bundled default: 6.3 s of context, short blocks.

Why (issue 15's measurements of the `demo` model): streams forget their context and converge to
a standing texture (primed and unprimed streams meet within 2-10 s; the chroma correlation of
the generated audio with its own context is -0.01, real music 0.48). `demo` sees K = 3 chunks of
16 frames at 43.07 frames/s: 1.1 s, less than a bar; the paper's model sees 3 x 2.23 s = 6.7 s.

What changes (everything else is `demo`'s: the weight-free `spectral` codec, 22.05 kHz mono,
43.07 frames/s, 192 dims; all-MiniLM-L6-v2 prompts, 384 wide, up to 32 tokens; input_add
[context mask | context | accompaniment mask | accompaniment | sketch (14)]; width 256, depth 6,
4 heads, 8,422,976 parameters, the same for any K and W):
- K = 17 context chunks of 16 frames: 272 frames = 6.32 s of context. The blocks stay 16 frames
  (0.37 s), since a jam's delay is counted in blocks; more context comes from more chunks, not
  longer ones (the paper's 2.23-s blocks would make a 2.2-s jam delay).
- W = 18 window chunks, one more than K as in the authors' window (4 context chunks around an
  attention reach of 3) and in `demo` (4 / 3): rotary positions follow the authors' layout
  (``DiTConfig.positions`` = "authors": global token at 0, the noisy chunk from W * 16 + 1) and a
  fresh stream starts from W = 18 zero-latent chunks marked present (``layouts.start_chunks``).
  It is also the only W the authors' config format can hold: `lmdm export` writes
  block_causal_window_chunks = K + 1 and fixed_mask_size = W x 16, both W in their configs.
- Stage-1 sequences of 20 chunks (7.4 s): the last 3 noisy chunks see a full 17-chunk context
  (with K = 17 a noisy chunk i < 17 sees only i chunks, as after a context drop); `demo`'s 12.
- ``p_start`` 0.1: a tenth of the sequences begin with the stream's real start (18 zero chunks,
  mask 1), so the model is trained on what a fresh stream shows it; their chunks 18 and 19 carry
  the loss (blocks 0 and 1 of a fresh stream; training.stage1).
- Batch 8 and AdamW 4e-4 (warmup 200, b2 .99, clip 1, EMA .998), as `demo`, where these were
  stable at this width and batch; a step holds 160 noisy chunks (`demo` 96). Checkpoints every
  50 steps: a step is 299 model GFLOP against `demo`'s 164 (x1.8; 660 tokens a sequence against
  396; bench/train_throughput.py's count), so a CPU run spans sittings and loses at most 50
  steps to an interruption.

What it costs to stream: a denoising step attends to 17 x 16 = 272 cached frames instead of 48,
283 model MFLOP against 260 (x1.09: the projections and feed-forward, most of the work at this
width, do not change); a fresh stream's first block also primes the 18 zero chunks once (4.7
GFLOP, about 17 denoising steps).
ARC-Forcing: `arc_live`.
"""
import ml_collections

from lmdm_jax.config import load_config

K, W = 17, 18


def get_config(regime: str = "block_causal"):
  c = load_config(f"demo:{regime}")
  c.name = "live"
  c.model.context_chunks = K
  c.model.window_chunks = W
  c.model.positions = "authors"
  c.train = ml_collections.ConfigDict(dict(
      batch_size=8, steps=20000, ckpt_every=50, keep=3, log_every=10, eval_every=250,
      eval_batches=4, fsdp=1,
      stage1=dict(chunks=20, p_start=0.1, lr=4e-4, warmup_steps=200, clip_norm=1.0,
                  weight_decay=0.01, b2=0.99, ema_decay=0.998)))
  return c
