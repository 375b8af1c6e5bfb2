"""Stage 1: teacher-forced training on long sequences with the streaming mask.

A training sequence of n chunks is laid out as [clean chunks 0..n-1 | noisy chunk 0, its global
token | noisy chunk 1, ... ] (``layouts.sequence_layout``, in the model's rotary layout
``DiTConfig.positions``: new models the authors' window positions). Every noisy chunk gets its own
diffusion time and noise; the loss is the rectified-flow MSE on the noisy chunks. The mask is the
one cached streaming uses, so what is trained is exactly what streams (unlike the reference, which
trains on 5-chunk windows and streams with a different attention pattern).

Dropout, following the reference (LMDM_REFERENCE §2) in our semantics:
- context dropout per noisy chunk: with p_uncond it sees none of its K context chunks, else with
  p_partial the oldest k ~ U{1..K} of them are hidden (k = K is a full drop). Hidden chunks are
  *absent* (masked), as at the start of a legacy stream, rather than zero latents: the clean
  chunks are shared by every noisy chunk of the sequence, so zeroing them for one noisy chunk
  only (the reference's dropout) is not expressible here; zeroing them for a whole sequence is,
  which is how the authors' stream start is trained (start sequences, below);
- CFG dropout per sequence: with p_cfg the conditioning tokens are zeroed (the global token is
  never dropped); extra input_add groups (sketch, accompaniment) are zeroed with p_cfg each.
Stream starts (``p_start``, default 0: off): since hidden chunks are absent rather than zero, the
dropout above never shows a model the start a fresh stream of the authors' layout begins from,
``layouts.start_chunks`` = W zero-latent chunks marked present. With p_start a sequence is a
*start sequence*: its clean chunks 0..W-1 become that start (zero latents, zero extra channels,
context mask 1, at stream indices 0..W-1 as ``sampling.start_stream`` commits them), the noisy
copies of those chunks get no loss (no other token sees them), and it has no context dropout, so
its noisy chunks W, W+1, ... are exactly blocks 0, 1, ... of a fresh stream whose earlier blocks
were the data (tests/test_stream_start.py). Needs chunks > W; the legacy layout starts from an
empty cache (a full hide, which p_uncond trains), so there p_start changes nothing. Its draw
comes from its own key (``START_KEY`` folded in), so p_start = 0 leaves every other draw, and the
loss, bit-identical.
Diffusion time: u ~ U(0, 1) shifted as t = s u / (1 + (s - 1) u), s = e^0.5 (the reference's
distribution shift for 240-frame windows).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lmdm_jax import layouts
from lmdm_jax.config import dataclass_from_config
from lmdm_jax.nn import attention as A
from lmdm_jax.nn.dit import DiT
from lmdm_jax.training.init_from import with_freeze


@dataclasses.dataclass(frozen=True)
class Stage1Config:
  chunks: int = 8  # chunks per training sequence
  p_uncond: float = 0.2  # context dropout: hide all context of a noisy chunk
  p_partial: float = 0.3  # context dropout: hide the oldest k ~ U{1..K} context chunks
  p_cfg: float = 0.1  # conditioning dropout
  p_start: float = 0.0  # sequences that begin with the stream's start (W zero chunks); 0 = off
  time_shift: float = float(np.exp(0.5))
  lr: float = 5e-5
  warmup_steps: int = 0
  b1: float = 0.9
  b2: float = 0.999
  weight_decay: float = 0.0
  clip_norm: float = 0.0  # 0 = off
  ema_decay: float = 0.0  # 0 = no EMA

  def __post_init__(self):
    for name in ("p_uncond", "p_partial", "p_cfg", "p_start"):
      v = getattr(self, name)
      if not 0.0 <= v <= 1.0:
        raise ValueError(f"train.stage1.{name} must be a probability in [0, 1], got {v!r}")

  @classmethod
  def from_config(cls, cfg) -> "Stage1Config":
    return dataclass_from_config(cls, cfg, "train.stage1")


START_KEY = 0x5741  # folded into a step's key for the start-sequence draw (not one of its splits)


class Prediction(NamedTuple):
  """The training forward of one batch (``Stage1.predict``)."""

  v: jax.Array  # (B, frames, C) predicted velocity of every noisy chunk
  target: jax.Array  # (B, frames, C) eps - x0
  weight: jax.Array  # (B, frames) loss weight per frame (frame_mask; 0 on a start's zero chunks)
  x_t: jax.Array  # (B, frames, C) the noisy chunks' input
  t: jax.Array  # (B, chunks) diffusion time per noisy chunk
  start: jax.Array | None  # (B,) bool: start sequences (None when p_start is off)


def make_optimizer(tc: Stage1Config) -> optax.GradientTransformation:
  lr = tc.lr if tc.warmup_steps <= 0 else optax.linear_schedule(0.0, tc.lr, tc.warmup_steps)
  parts = [optax.clip_by_global_norm(tc.clip_norm)] if tc.clip_norm > 0 else []
  parts.append(optax.adamw(lr, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay))
  return optax.chain(*parts)


def sample_times(key, shape, shift: float):
  u = jax.random.uniform(key, shape)
  return shift * u / (1 + (shift - 1) * u)


def context_drop(key, batch: int, chunks: int, K: int, p_uncond: float, p_partial: float):
  """Hidden oldest-context count per (sequence, noisy chunk), int32 in 0..K."""
  k1, k2 = jax.random.split(key)
  r = jax.random.uniform(k1, (batch, chunks))
  k = jax.random.randint(k2, (batch, chunks), 1, K + 1)
  return jnp.where(r < p_uncond, K, jnp.where(r < p_uncond + p_partial, k, 0)).astype(jnp.int32)


def dropout_mask(base_mask, meta: A.TokenMeta, hidden, K: int):
  """Per-sequence mask (B, N, N): noisy/global queries of chunk i also lose clean keys of chunks
  below i - K + hidden[b, i]."""
  noisy_q = jnp.asarray(meta.kind != A.CLEAN)
  qc = jnp.asarray(meta.chunk)
  # hidden count of each query's own noisy chunk (clean queries: 0)
  h = jnp.where(noisy_q[None], jnp.take_along_axis(
      hidden, jnp.clip(qc, 0, hidden.shape[1] - 1)[None].repeat(hidden.shape[0], 0), axis=1), 0)
  k_clean = jnp.asarray(meta.kind == A.CLEAN)
  kc = jnp.asarray(meta.chunk)
  lost = noisy_q[None, :, None] & k_clean[None, None, :] & (
      kc[None, None, :] < (qc[None, :, None] - K + h[:, :, None]))
  return jnp.asarray(base_mask)[None] & ~lost


class Stage1:
  """Loss and update step for stage-1 training of one model configuration."""

  def __init__(self, model: DiT, tc: Stage1Config, freeze: str = ""):
    """``freeze``: a regex; parameters whose name it matches in full are not updated
    (``init_from.with_freeze``)."""
    cfg = model.cfg
    self.cfg, self.tc = cfg, tc
    self.n_start = layouts.start_chunks(cfg) if tc.p_start > 0 else 0
    if self.n_start >= tc.chunks:
      raise ValueError(f"train.stage1.p_start {tc.p_start}: a start sequence's first "
                       f"{self.n_start} chunks are the stream's zero start (window_chunks), so "
                       f"train.stage1.chunks ({tc.chunks}) must be larger")
    self.layout = layouts.sequence_layout(tc.chunks, np.arange(tc.chunks), layouts.span(cfg),
                                          cfg.chunk)
    self.base_mask = A.streaming_mask(self.layout.meta, self.layout.meta, cfg.context_chunks)
    self.rope = A.rope_tables(np.asarray(model.inv_freq[...]), self.layout.meta.pos)
    self.graphdef, _, _ = nnx.split(model, nnx.Param, ...)
    self.tx = with_freeze(make_optimizer(tc), freeze)

  @property
  def frames(self) -> int:
    return self.tc.chunks * self.cfg.chunk

  def init_state(self, model: DiT) -> dict:
    _, params, rest = nnx.split(model, nnx.Param, ...)
    state = {"params": params, "rest": rest, "opt": self.tx.init(params),
             "step": jnp.zeros((), jnp.int32)}
    if self.tc.ema_decay > 0:
      state["ema"] = jax.tree.map(jnp.copy, params)
    return state

  def predict(self, params, rest, batch: dict, key, train: bool = True) -> Prediction:
    """The training forward: batch: latents (B, frames, C), cond (B, S, Dc), global_cond (B, Dg),
    frame_mask (B, frames), optional extra (B, frames, E). Without ``train`` no dropout is applied
    and no start sequences are drawn (held-out loss)."""
    cfg, tc = self.cfg, self.tc
    n_start = self.n_start
    if not train:
      tc = dataclasses.replace(tc, p_uncond=0.0, p_partial=0.0, p_cfg=0.0)
      n_start = 0
    model = nnx.merge(self.graphdef, params, rest)
    x0 = batch["latents"].astype(jnp.float32)
    b = x0.shape[0]
    n, cs = tc.chunks, cfg.chunk
    k_t, k_eps, k_ctx, k_cfg, k_extra = jax.random.split(key, 5)
    t = sample_times(k_t, (b, n), tc.time_shift)
    eps = jax.random.normal(k_eps, x0.shape)
    t_f = jnp.repeat(t, cs, axis=1)[..., None]
    x_t = (1 - t_f) * x0 + t_f * eps
    cond = batch["cond"]
    drop = jax.random.uniform(k_cfg, (b,)) < tc.p_cfg
    cond = jnp.where(drop[:, None, None], 0.0, cond)
    extra = batch.get("extra")
    if extra is not None:
      keep = jax.random.uniform(k_extra, (b,)) >= tc.p_cfg
      extra = extra * keep[:, None, None]
    hidden = context_drop(k_ctx, b, n, cfg.context_chunks, tc.p_uncond, tc.p_partial)
    clean, clean_extra, start, zero = x0, extra, None, None
    if n_start:  # start sequences: clean chunks 0..W-1 are the stream's zero start
      start = jax.random.uniform(jax.random.fold_in(key, START_KEY), (b,)) < tc.p_start
      zero = start[:, None] & (jnp.arange(n * cs) < n_start * cs)[None]  # (B, frames)
      clean = jnp.where(zero[..., None], 0.0, x0)
      if extra is not None:
        clean_extra = jnp.where(zero[..., None], 0.0, extra)
      hidden = jnp.where(start[:, None], 0, hidden)
    mask = dropout_mask(self.base_mask, self.layout.meta, hidden, cfg.context_chunks)
    cross = model.cross_kv(cond) if cfg.cond_token_dim else None
    g = model.project_global(batch.get("global_cond"))
    v = layouts.sequence_forward(model, clean, x_t, t, cross, g, self.layout, clean_extra, extra,
                                 rope=self.rope, mask=mask)
    w = batch.get("frame_mask")
    w = jnp.ones(v.shape[:2], jnp.float32) if w is None else w.astype(jnp.float32)
    if zero is not None:
      w = jnp.where(zero, 0.0, w)
    return Prediction(v, eps - x0, w, x_t, t, start)

  def loss(self, params, rest, batch: dict, key, train: bool = True):
    """The rectified-flow MSE of ``predict`` over the weighted frames. Returns (loss, metrics)."""
    p = self.predict(params, rest, batch, key, train)
    err = jnp.square(p.v - p.target).mean(-1)
    loss = (err * p.weight).sum() / jnp.maximum(p.weight.sum(), 1.0)
    return loss, {"loss": loss}

  def train_step(self, state: dict, batch: dict, key):
    (loss, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(
        state["params"], state["rest"], batch, key)
    updates, opt = self.tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = dict(state, params=params, opt=opt, step=state["step"] + 1)
    if "ema" in state:
      d = self.tc.ema_decay
      new["ema"] = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state["ema"], params)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads))
    return new, metrics

  def eval_loss(self, state: dict, batch: dict, key):
    """Held-out loss with the same noise/time sampling but no dropout."""
    return self.loss(state["params"], state["rest"], batch, key, train=False)[0]


def model_from_state(graphdef, state: dict, use_ema: bool = False) -> Any:
  return nnx.merge(graphdef, state["ema" if use_ema and "ema" in state else "params"], state["rest"])
