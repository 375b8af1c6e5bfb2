"""ARC-Forcing: adversarial post-training of a frozen LMDM through a low-rank adapter.

LMDM_REFERENCE §4, in our exact streaming semantics:
- **Generator** = the frozen base DiT + ``nn.adapters`` (only the adapter is trained).
- **Rollouts with the real sampler.** From real context (with the reference's self-forcing context
  dropout: p_uncond 0.25 hides all K context chunks, else p_partial 0.1 hides the oldest
  k ~ U{1..K}; hidden chunks are zero latents, present, after the zero start chunks the context
  does not cover, as a stream starts in the authors' layout (their dropout, without the shift);
  in the legacy layout they are *absent*, as a legacy stream starts), n blocks are generated
  autoregressively with the cached block-causal stream of ``sampling.generate_block``: the same
  KV ring, fused commit of the previous block in the first step, window-relative rotary tables,
  schedule and pingpong update. Each block draws k ~ U{1..max_k} (shared by the batch, as the
  reference) and runs steps 0..k-2 of the ``steps``-step schedule without gradient (the model is
  merged from stop-gradient'ed parameters, so no tangent enters the loop); step k-1 runs with
  gradient and its denoised prediction x - t_{k-1} v is the block. The window slide (the pending
  block) and the cache writes are detached, so gradients never cross blocks. Blocks are a
  ``lax.scan``; the gradient step is rematerialized (``jax.checkpoint``), so each block keeps only
  its inputs (x, t, its K/V ring) for the backward pass, not its activations.
  With k = steps a rollout block equals ``generate_block``'s output (tested).
  Text (CFG) dropout with p_cfg is drawn once per rollout and item (the reference caches the
  cross-attention K/V at the stream's bootstrap, so it is effectively per rollout too).
- **Discriminator** = features of a frozen DiT (by default the generator's own base weights with
  the adapter off; or a separate base model, e.g. ``saos:base``) after block ``disc_exit_layer``,
  over the whole noised [context | rollout] sequence with the reference window forward
  (``DiT.__call__``, no mask, no context mask; zero input_add channels for an LMDM backbone),
  plus a trainable ``ConvNeXtHead`` over the rollout frames (the reference slices ``[:, C:]``
  including the prepend token, off by one; we take exactly the rollout frames).
  Real and fake share the noise level and the noise; hidden context chunks are zeros in both.
- **Losses** (relativistic): L_G = w_g mean softplus(s(real) - s(fake));
  L_D = w_d mean softplus(-(s(real) - s(fake))) + w_c mean softplus(-(s(real) - s(real | rolled
  prompt))), the prompt rolled by one across the batch (``jnp.roll``: item i gets item i-1's
  conditioning tokens). With batch 1 there is no other prompt and the contrastive term is 0.
- **Optimization**: alternating G (even steps) and D (odd steps) updates; two AdamW (lr 1e-6,
  betas .9/.95, wd .01, clip 1.0). Gradients are taken w.r.t. the adapter (G) or the head (D)
  only; optimizer states exist only for those leaves; base parameters are arguments that are
  never updated.
- **Scale**: the same sharding as stage 1 (``training.sharding``): under the (data, fsdp) mesh the
  batch is split over both axes, and the frozen base (and a separate discriminator backbone), the
  adapter, the head and both optimizer states are each laid out by ``sharding.state_shardings``
  (FSDP over ``fsdp`` along a leaf's largest divisible dimension). ``jit_step`` builds either step
  with those in/out shardings; one device is a mesh of one.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lmdm_jax import layouts
from lmdm_jax import sampling as S
from lmdm_jax.cache import KVCache
from lmdm_jax.nn import adapters
from lmdm_jax.nn import attention as A
from lmdm_jax.nn.dit import DiT
from lmdm_jax.nn.discriminator import ConvNeXtHead
from lmdm_jax.training import sharding
from lmdm_jax.training.stage1 import context_drop
from lmdm_jax.config import dataclass_from_config


@dataclasses.dataclass(frozen=True)
class ARCConfig:
  rollout_blocks: int = 12  # n blocks per rollout
  steps: int = 6  # schedule length
  max_k: int = 5  # k ~ U{1..max_k} steps per block (the reference: randint(1, 6), exclusive)
  p_uncond: float = 0.25  # self-forcing context dropout
  p_partial: float = 0.1
  p_cfg: float = 0.1  # text dropout of the generator's conditioning, once per rollout
  disc_exit_layer: int = 12  # discriminator features after this block (0-based)
  disc_noise: str = "logsnr_uniform"  # or "logit_normal"
  lr_g: float = 1e-6
  lr_d: float = 1e-6
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  w_g: float = 1.0
  w_d: float = 1.0
  w_contrastive: float = 2.0
  remat: bool = True  # rematerialize the gradient step of each block and the discriminator

  def __post_init__(self):
    if not 1 <= self.max_k <= self.steps:
      raise ValueError(f"max_k must be in 1..steps={self.steps}, got {self.max_k}")
    if self.disc_noise not in ("logsnr_uniform", "logit_normal"):
      raise ValueError(f"disc_noise: 'logsnr_uniform' or 'logit_normal', got {self.disc_noise!r}")

  @classmethod
  def from_config(cls, c) -> "ARCConfig":
    return dataclass_from_config(cls, c, "arc")


def make_tx(ac: ARCConfig, lr: float) -> optax.GradientTransformation:
  parts = [optax.clip_by_global_norm(ac.clip_norm)] if ac.clip_norm > 0 else []
  parts.append(optax.adamw(lr, b1=ac.b1, b2=ac.b2, eps=ac.eps, weight_decay=ac.weight_decay))
  return optax.chain(*parts)


def roll_prompts(cond):
  """The contrastive negatives' conditioning: item i gets item i-1's (a different item for B>1)."""
  return jnp.roll(cond, 1, axis=0)


def _lookup(tables, pos, offset):
  cos, sin = tables
  return jnp.take(cos, pos + offset, axis=0), jnp.take(sin, pos + offset, axis=0)


class ARCForcing:
  """Rollouts, discriminator scores, losses and the two update steps.

  ``model``: an adapted DiT (``adapters.add_adapters``); ``head``: the trainable head;
  ``disc``: an optional separate frozen discriminator backbone (default: the generator's base).
  Train state (checkpointed): {"adapter", "head", "opt_g", "opt_d", "step"}; frozen arrays
  (never updated, not checkpointed here): {"params", "rest"[, "disc_params", "disc_rest"]}.
  """

  def __init__(self, model: DiT, ac: ARCConfig, head: ConvNeXtHead, disc: DiT | None = None):
    cfg = model.cfg
    if not cfg.streaming:
      raise ValueError("ARC-Forcing needs a streaming (LMDM) generator with input_add channels")
    self.cfg, self.ac = cfg, ac
    self.gd = adapters.split(model)[0]
    self.head_gd = nnx.split(head)[0]
    if disc is None:
      self.disc_gd, self.disc_cfg = adapters.plain_graphdef(cfg), cfg
    else:
      self.disc_gd, self.disc_cfg = nnx.split(disc, nnx.Param, ...)[0], disc.cfg
    if not 0 <= ac.disc_exit_layer < self.disc_cfg.depth:
      raise ValueError(f"disc_exit_layer {ac.disc_exit_layer} is not a block of the "
                       f"{self.disc_cfg.depth}-block discriminator backbone")
    self.separate_disc = disc is not None
    self.tables = S.rope_window_tables(model)
    self.tx_g = make_tx(ac, ac.lr_g)
    self.tx_d = make_tx(ac, ac.lr_d)
    self.sp = S.SamplerParams.make(steps=ac.steps, cfg_scale=1.0, plus_plus=False, pingpong=True)

  # --------------------------------------------------------------------------------- state

  @property
  def context_frames(self) -> int:
    return self.cfg.context_chunks * self.cfg.chunk

  @property
  def frames(self) -> int:
    """Frames per training sequence: K context chunks + the n real continuation chunks."""
    return (self.cfg.context_chunks + self.ac.rollout_blocks) * self.cfg.chunk

  def init(self, model: DiT, head: ConvNeXtHead, disc: DiT | None = None):
    """(train state, frozen arrays)."""
    _, adapter, params, rest = adapters.split(model)
    _, head_p = nnx.split(head)
    state = {"adapter": adapter, "head": head_p, "opt_g": self.tx_g.init(adapter),
             "opt_d": self.tx_d.init(head_p), "step": jnp.zeros((), jnp.int32)}
    frozen = {"params": params, "rest": rest}
    if disc is not None:
      _, frozen["disc_params"], frozen["disc_rest"] = nnx.split(disc, nnx.Param, ...)
    return state, frozen

  # ------------------------------------------------------------------------------- rollout

  def draw(self, key, batch: int):
    """Random choices of one rollout: steps per block (n,), hidden context chunks per item (B,),
    text dropout per item (B,), and the stream's PRNG key."""
    ac, K = self.ac, self.cfg.context_chunks
    k_k, k_ctx, k_cfg, k_stream = jax.random.split(key, 4)
    ks = jax.random.randint(k_k, (ac.rollout_blocks,), 1, ac.max_k + 1).astype(jnp.int32)
    hidden = context_drop(k_ctx, batch, 1, K, ac.p_uncond, ac.p_partial)[:, 0]
    drop = jax.random.uniform(k_cfg, (batch,)) < ac.p_cfg
    return ks, hidden, drop, k_stream

  def rollout(self, adapter, frozen, ctx, cond, global_cond, key, ks, hidden,
              keep_intermediates: bool = False):
    """Generate len(ks) blocks after the real context ``ctx`` (B, K*chunk, C).

    ks: (n,) int32 steps for each block (1..steps); hidden: (B,) int32 oldest context chunks
    hidden from each item (K = none visible). Returns (blocks (B, n*chunk, C), aux) where aux
    holds per block x_last (the gradient step's input), t_last and, with ``keep_intermediates``,
    the K/V ring it attended to (for tests).
    """
    cfg, ac = self.cfg, self.ac
    K, cs, C = cfg.context_chunks, cfg.chunk, cfg.io_channels
    b = ctx.shape[0]
    sg = jax.lax.stop_gradient
    params, rest = frozen["params"], frozen["rest"]
    model = nnx.merge(self.gd, adapter, params, rest)
    model_ng = nnx.merge(self.gd, sg(adapter), sg(params), rest)
    cross = model.cross_kv(cond) if cfg.cond_token_dim else None
    g = model.project_global(global_cond)
    if g is None:
      g = jnp.zeros((b, cfg.embed_dim), model.compute_dtype)
    cross_len = cond.shape[1] if cfg.cond_token_dim else 1
    cache = KVCache.create(cfg, b, K, cross_len)
    if cross is not None:
      cache = cache.with_prompt(sg(cross), sg(g))
    else:
      cache = cache.replace(global_embed=sg(g).astype(cache.global_embed.dtype))
    cross_ng = cache.cross()
    g_ng = cache.global_embed
    extra0 = jnp.zeros((b, cs, cfg.extra_dim), jnp.float32)
    tables = self.tables
    hidden = jnp.asarray(hidden, jnp.int32)

    # Prime the ring with the real context's clean K/V (detached), as a stream primed with it
    # (``Stream.prime``). Legacy layout: chunks 0..K-1, hidden chunks absent (masked, here and in
    # every step). Authors' layout: hidden chunks are zero latents, present (the authors' context
    # dropout), after the zero start chunks the context does not cover.
    frame_chunk = jnp.arange(K * cs) // cs
    n_pad = max(layouts.start_chunks(cfg) - K, 0)
    ctx = ctx.astype(jnp.float32)
    visible = None
    if layouts.start_chunks(cfg):
      ctx = jnp.where((frame_chunk[None] < hidden[:, None])[..., None], 0.0, ctx)
      ctx = jnp.concatenate([jnp.zeros((b, n_pad * cs, C), jnp.float32), ctx], axis=1)
      hidden = jnp.zeros_like(hidden)
    else:
      visible = frame_chunk[None] >= hidden[:, None]
    cache = S.prime_ring(model_ng, tables, cache, ctx,
                         jnp.zeros((b, (n_pad + K) * cs, cfg.extra_dim), jnp.float32), visible)

    def run(m, c: KVCache, x, t, pend_x, has_pend, i, with_pending, cross_, g_, hid):
      """One denoising forward, exactly ``generate_block``'s (no CFG), plus per-item hiding."""
      pos = layouts.cached_positions(i, layouts.span(cfg), cs)
      noisy = A.TokenMeta.concat(A.chunk_meta(i[None], A.NOISY, cs, pos, xp=jnp),
                                 A.global_meta(i, 0, xp=jnp))
      past_meta = c.slot_meta(pos)
      fresh = noisy
      if with_pending:
        pend = A.chunk_meta((i - 1)[None], A.CLEAN, cs, pos, valid=has_pend > 0, xp=jnp)
        fresh = A.TokenMeta.concat(pend, noisy)
      mask = A.streaming_mask(fresh, A.TokenMeta.concat(past_meta, fresh), K)
      seen = jnp.concatenate([past_meta.chunk[None] >= hid[:, None],
                              jnp.ones((b, len(fresh)), bool)], axis=1)
      mask = mask[None] & seen[:, None, :]
      gt = m.embed_global(g_, jnp.full((b,), t))[:, None]
      h = jnp.concatenate([m.embed_noisy(x, extra0), gt], axis=1)
      if with_pending:
        h = jnp.concatenate([m.embed_clean(pend_x, extra0), h], axis=1)
      out, kv = m.forward_tokens(h, _lookup(tables, fresh.pos, cs), mask, cross_, c.past(),
                                 _lookup(tables, past_meta.pos, cs))
      p = cs if with_pending else 0
      return m.velocity(out[:, p:p + cs]), kv

    def last_step(adapter_, params_, rest_, cross_, g_, c, x, t, i, hid):
      m = nnx.merge(self.gd, adapter_, params_, rest_)
      v, _ = run(m, c, x, t, None, None, i, False, cross_, g_, hid)
      return x - t * v

    if ac.remat:
      last_step = jax.checkpoint(last_step)
    tsched = S.schedule(ac.steps, max_steps=ac.steps)
    sp = self.sp

    def body(carry, k):
      c, pending, has_pend, i, key = carry
      key, x0, eps = S.block_noise(key, (b, cs, C))
      # step 0, fused with the commit of the pending block (no gradient)
      v0, kv = run(model_ng, c, x0, tsched[0], pending, has_pend, i, True, cross_ng, g_ng, hidden)
      new_c = c.commit(jax.tree.map(lambda a: sg(a[:, :, :cs]), kv), i - 1, has_pend > 0)
      x1 = S.update(x0, v0, v0, tsched[0], tsched[1], eps(0), sp, False)

      def loop(s, x):
        v, _ = run(model_ng, new_c, x, tsched[s], None, None, i, False, cross_ng, g_ng, hidden)
        return S.update(x, v, v, tsched[s], tsched[s + 1], eps(s), sp, False)

      x_last = jnp.where(k == 1, x0, jax.lax.fori_loop(1, k - 1, loop, x1))
      t_last = tsched[k - 1]
      block = last_step(adapter, params, rest, cross, g, new_c, x_last, t_last, i, hidden)
      out = dict(block=block, x_last=x_last, t_last=t_last)
      if keep_intermediates:
        out["cache"] = new_c
      return (new_c, sg(block), jnp.ones((), jnp.int32), i + 1, key), out

    carry = (cache, jnp.zeros((b, cs, C), jnp.float32), jnp.zeros((), jnp.int32),
             cache.next_chunk, key)
    _, outs = jax.lax.scan(body, carry, jnp.asarray(ks, jnp.int32))
    blocks = jnp.swapaxes(outs.pop("block"), 0, 1).reshape(b, -1, C)
    return blocks, outs

  # ------------------------------------------------------------------------- discriminator

  def disc_times(self, key, batch: int):
    if self.ac.disc_noise == "logsnr_uniform":
      return jax.nn.sigmoid(-(-6.0 + 8.0 * jax.random.uniform(key, (batch,))))
    return jax.nn.sigmoid(jax.random.normal(key, (batch,)))

  def scores(self, head_p, frozen, x, t, cond, global_cond):
    """Head logits (N, P) over the rollout frames of noised sequences x (N, T, C)."""
    dc, ac = self.disc_cfg, self.ac
    dparams = frozen["disc_params"] if self.separate_disc else frozen["params"]
    drest = frozen["disc_rest"] if self.separate_disc else frozen["rest"]
    gd = self.disc_gd

    def feats(dparams, drest, x, t, cond, gc):
      disc = nnx.merge(gd, dparams, drest)
      ia = (jnp.zeros(x.shape[:2] + (dc.input_add_dim,), x.dtype) if dc.input_add_dim else None)
      return disc(x, t, cond if dc.cond_token_dim else None, gc if dc.global_cond_dim else None,
                  input_add=ia, exit_layer=ac.disc_exit_layer)

    if ac.remat:
      feats = jax.checkpoint(feats)
    h = feats(dparams, drest, x, t, cond, global_cond)
    frames = h[:, 1:] if dc.global_token == "prepend" else h[:, :-1]
    head = nnx.merge(self.head_gd, head_p)
    return head(frames[:, self.context_frames:])

  def _sequences(self, batch, blocks, hidden, key):
    """Noised real and fake [context | continuation] sequences, sharing t and the noise."""
    cs, n_ctx = self.cfg.chunk, self.context_frames
    lat = batch["latents"].astype(jnp.float32)
    ctx = lat[:, :n_ctx]
    frame_chunk = jnp.arange(n_ctx) // cs
    ctx_d = jnp.where((frame_chunk[None] < hidden[:, None])[..., None], 0.0, ctx)
    real = jnp.concatenate([ctx_d, lat[:, n_ctx:]], axis=1)
    fake = jnp.concatenate([ctx_d, blocks], axis=1)
    k_t, k_eps = jax.random.split(key)
    b = lat.shape[0]
    t = self.disc_times(k_t, b)
    eps = jax.random.normal(k_eps, real.shape)
    tf = t[:, None, None]
    return (1 - tf) * real + tf * eps, (1 - tf) * fake + tf * eps, t

  def _check_batch(self, batch):
    got = batch["latents"].shape[1]
    if got != self.frames:
      raise ValueError(f"ARC batch: {got} frames per item; need {self.frames} = (context_chunks "
                       f"{self.cfg.context_chunks} + rollout_blocks {self.ac.rollout_blocks}) x "
                       f"chunk {self.cfg.chunk}")

  def _rollout_from_batch(self, adapter, frozen, batch, key):
    self._check_batch(batch)
    lat = batch["latents"].astype(jnp.float32)
    b = lat.shape[0]
    ks, hidden, drop, k_stream = self.draw(key, b)
    cond = batch.get("cond")
    if cond is None:
      cond = jnp.zeros((b, 1, max(self.cfg.cond_token_dim, 1)), jnp.float32)
    cond_g = jnp.where(drop[:, None, None], 0.0, cond)
    blocks, _ = self.rollout(adapter, frozen, lat[:, :self.context_frames], cond_g,
                             batch.get("global_cond"), k_stream, ks, hidden)
    return blocks, hidden, cond, ks

  # -------------------------------------------------------------------------------- losses

  def g_loss(self, adapter, head_p, frozen, batch, key):
    k_roll, k_disc = jax.random.split(key)
    blocks, hidden, cond, ks = self._rollout_from_batch(adapter, frozen, batch, k_roll)
    xr, xf, t = self._sequences(batch, blocks, hidden, k_disc)
    b = xr.shape[0]
    gc = batch.get("global_cond")
    s = self.scores(head_p, frozen, jnp.concatenate([xr, xf]), jnp.concatenate([t, t]),
                    jnp.concatenate([cond, cond]), None if gc is None else jnp.concatenate([gc, gc]))
    s_r, s_f = s[:b], s[b:]
    loss = self.ac.w_g * jnp.mean(jax.nn.softplus(s_r - s_f))
    real = batch["latents"][:, self.context_frames:].astype(jnp.float32)
    sg = jax.lax.stop_gradient
    # collapse monitors: the rollout's latent RMS against the real continuation's
    return loss, {"loss_g": loss, "s_real": s_r.mean(), "s_fake": s_f.mean(),
                  "k_mean": ks.astype(jnp.float32).mean(),
                  "rms_fake": jnp.sqrt(jnp.mean(sg(blocks) ** 2)),
                  "rms_real": jnp.sqrt(jnp.mean(real ** 2))}

  def d_loss(self, head_p, frozen, batch, blocks, hidden, cond, key):
    xr, xf, t = self._sequences(batch, blocks, hidden, key)
    b = xr.shape[0]
    gc = batch.get("global_cond")
    contrastive = b > 1 and self.cfg.cond_token_dim > 0 and self.ac.w_contrastive != 0
    xs, ts, cs_, gs = [xr, xf], [t, t], [cond, cond], [gc, gc]
    if contrastive:
      xs.append(xr), ts.append(t), cs_.append(roll_prompts(cond)), gs.append(gc)
    s = self.scores(head_p, frozen, jnp.concatenate(xs), jnp.concatenate(ts),
                    jnp.concatenate(cs_), None if gc is None else jnp.concatenate(gs))
    s_r, s_f = s[:b], s[b:2 * b]
    loss_d = self.ac.w_d * jnp.mean(jax.nn.softplus(-(s_r - s_f)))
    loss_c = (self.ac.w_contrastive * jnp.mean(jax.nn.softplus(-(s_r - s[2 * b:])))
              if contrastive else jnp.zeros(()))
    loss = loss_d + loss_c
    return loss, {"loss_d": loss_d, "loss_c": loss_c, "s_real": s_r.mean(),
                  "s_fake": s_f.mean(), "d_acc": jnp.mean((s_r > s_f).astype(jnp.float32))}

  # --------------------------------------------------------------------------------- steps

  def g_step(self, state, frozen, batch, key):
    """Generator update: gradients w.r.t. the adapter only (head and base are constants)."""
    (loss, m), grads = jax.value_and_grad(self.g_loss, has_aux=True)(
        state["adapter"], state["head"], frozen, batch, key)
    updates, opt = self.tx_g.update(grads, state["opt_g"], state["adapter"])
    adapter = optax.apply_updates(state["adapter"], updates)
    m = dict(m, loss=loss, grad_norm=optax.global_norm(grads))
    return dict(state, adapter=adapter, opt_g=opt, step=state["step"] + 1), m

  def d_step(self, state, frozen, batch, key):
    """Discriminator update: the rollout runs without gradient; gradients w.r.t. the head only."""
    k_roll, k_disc = jax.random.split(key)
    blocks, hidden, cond, _ = self._rollout_from_batch(
        jax.lax.stop_gradient(state["adapter"]), frozen, batch, k_roll)
    blocks = jax.lax.stop_gradient(blocks)
    (loss, m), grads = jax.value_and_grad(self.d_loss, has_aux=True)(
        state["head"], frozen, batch, blocks, hidden, cond, k_disc)
    updates, opt = self.tx_d.update(grads, state["opt_d"], state["head"])
    head = optax.apply_updates(state["head"], updates)
    m = dict(m, loss=loss, grad_norm=optax.global_norm(grads))
    return dict(state, head=head, opt_d=opt, step=state["step"] + 1), m

  @staticmethod
  def phase(step: int) -> str:
    """The reference's alternation: optimizer-step count mod 2 (G, D, G, D, ...)."""
    return "g" if int(step) % 2 == 0 else "d"

  def merged_model(self, state, frozen) -> DiT:
    """The adapted generator with the adapter folded into the base kernels (a plain DiT)."""
    return adapters.merge_adapters(nnx.merge(self.gd, state["adapter"], frozen["params"],
                                             frozen["rest"]))


def make_head(cfg_or_dim, hc, seed: int = 0) -> ConvNeXtHead:
  din = cfg_or_dim if isinstance(cfg_or_dim, int) else cfg_or_dim.embed_dim
  return ConvNeXtHead(din, hc, rngs=nnx.Rngs(seed))


def jit_step(trainer: ARCForcing, phase: str, state, frozen, mesh, donate: bool = True):
  """The G (``phase`` "g") or D ("d") update step jitted under the stage-1 ``mesh``: state
  (adapter, head, opt_g, opt_d) and frozen arrays with ``sharding.state_shardings``, the batch
  with ``sharding.batch_sharding``, the key and metrics replicated; the new state keeps the
  state's shardings. ``state``/``frozen`` give the tree structure (arrays or ShapeDtypeStructs).
  Returns (jitted fn, (state shardings, frozen shardings, batch sharding, replicated))."""
  if phase not in ("g", "d"):
    raise ValueError(f"phase: 'g' or 'd', got {phase!r}")
  ssh = sharding.state_shardings(state, mesh)
  fsh = sharding.state_shardings(frozen, mesh)
  bsh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  fn = jax.jit(trainer.g_step if phase == "g" else trainer.d_step,
               donate_argnums=(0,) if donate else (), in_shardings=(ssh, fsh, bsh, rep),
               out_shardings=(ssh, rep))
  return fn, (ssh, fsh, bsh, rep)


def step_memory(trainer: ARCForcing, state, frozen, batch, phase: str = "g", mesh=None) -> dict:
  """Compiled memory of one update step (bytes): XLA's temp (activations, residuals), argument
  and output sizes, from ``compiled.memory_analysis()`` (no execution), under ``mesh`` (default:
  a mesh of the first device). Sizes are per device."""
  mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.devices()[:1])
  fn, (ssh, fsh, bsh, _) = jit_step(trainer, phase, state, frozen, mesh, donate=False)

  def abstract(tree, shardings):
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sh),
                        tree, shardings)

  batch = dict(batch)
  compiled = fn.lower(abstract(state, ssh), abstract(frozen, fsh),
                      abstract(batch, jax.tree.map(lambda _: bsh, batch)),
                      jax.random.key(0)).compile()
  ma = compiled.memory_analysis()
  return {"temp": int(ma.temp_size_in_bytes), "args": int(ma.argument_size_in_bytes),
          "out": int(ma.output_size_in_bytes)}
