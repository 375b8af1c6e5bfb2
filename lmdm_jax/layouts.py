"""Token layouts of the streaming regimes, and the teacher-forcing forward over a whole stream.

Positions (DESIGN.md, "Exact streaming semantics"): for noisy chunk i the window is its S context
chunks and itself, S the model's *span* (``span(cfg)``): W = ``window_chunks`` in the authors'
layout (their training sample: W context chunks, the noisy chunk, the postpend global token),
K = ``context_chunks`` in the legacy one (models trained before ``DiTConfig.positions``). The
global token sits at window position 0 and frame j of chunk c at (c - i + S) * chunk + j + 1, so
the noisy chunk's frames start at S * chunk + 1. Attention reaches K previous chunks either way.
In a full-sequence pass every noisy chunk has its own global token, placed where its window
starts; shifting all positions by S * chunk makes them absolute:
  frame f (of a clean or noisy chunk) -> f + 1 + S * chunk,   global token of chunk i -> i * chunk.
Only differences enter attention (RoPE is relative), so both agree exactly.
The stream's start (``start_chunks``): the authors' stream starts from W zero-latent context
chunks marked present (context mask 1, their full-context-drop case); a legacy one from nothing.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmdm_jax.nn import attention as A
from lmdm_jax.nn.dit import DiT


def span(cfg) -> int:
  """Context chunks in a noisy chunk's rotary window: W (authors' layout) or K (legacy)."""
  return cfg.window_chunks if cfg.positions == "authors" else cfg.context_chunks


def start_chunks(cfg) -> int:
  """Zero-latent context chunks a fresh stream starts from: W (authors' layout) or 0 (legacy)."""
  return cfg.window_chunks if cfg.positions == "authors" else 0


def cached_positions(noisy_chunk, span: int, chunk: int):
  """Window-relative rotary position of frame j of chunk c, for the noisy chunk ``noisy_chunk``
  whose window holds ``span`` context chunks."""
  return lambda c, j: (c - noisy_chunk + span) * chunk + j + 1


class WindowLayout(NamedTuple):
  context: A.TokenMeta  # window context chunks 0..n_ctx-1 (clean)
  target: A.TokenMeta  # the target chunk n_ctx (noisy) + its global token
  all: A.TokenMeta  # context then target, the model's token order for the LMDM variant


def window_layout(n_ctx: int, chunk: int) -> WindowLayout:
  """A fixed window [n_ctx context chunks | target | global]: frame k at k + 1, global at 0
  (the reference's postpend layout)."""
  pos = lambda c, j: c * chunk + j + 1
  ctx = A.chunk_meta(np.arange(n_ctx), A.CLEAN, chunk, pos)
  tgt = A.TokenMeta.concat(A.chunk_meta([n_ctx], A.NOISY, chunk, pos), A.global_meta(n_ctx, 0))
  return WindowLayout(ctx, tgt, A.TokenMeta.concat(ctx, tgt))


class SequenceLayout(NamedTuple):
  meta: A.TokenMeta  # [clean chunks | noisy chunk 0, its global | noisy chunk 1, its global | ...]
  n_clean: int  # clean chunks
  noisy_chunks: np.ndarray  # stream index of each noisy chunk


def sequence_layout(n_clean: int, noisy_chunks, span: int, chunk: int) -> SequenceLayout:
  """Teacher-forcing layout over a stream: clean chunks 0..n_clean-1, then noisy chunks (each
  followed by its global token), absolute positions (global token of chunk i at i * chunk) for
  windows of ``span`` context chunks (``span(cfg)``)."""
  noisy_chunks = np.asarray(noisy_chunks, np.int32).reshape(-1)
  shift = span * chunk
  pos = lambda c, j: c * chunk + j + 1 + shift
  parts = [A.chunk_meta(np.arange(n_clean), A.CLEAN, chunk, pos)]
  for i in noisy_chunks:
    parts.append(A.chunk_meta([i], A.NOISY, chunk, pos))
    parts.append(A.global_meta(i, i * chunk))
  return SequenceLayout(A.TokenMeta.concat(*parts), n_clean, noisy_chunks)


def sequence_forward(model: DiT, clean, noisy, t, cross, global_embed, layout: SequenceLayout,
                     clean_extra=None, noisy_extra=None, rope=None, exit_layer=None, mask=None):
  """Teacher-forcing forward: velocity of every noisy chunk given the clean chunks.

  clean: (B, n_clean * chunk, C); noisy: (B, n_noisy * chunk, C); t: (B, n_noisy) diffusion time
  per noisy chunk; cross: CrossKV; global_embed: (B, D) projected global conditioning or None.
  rope: precomputed (cos, sin) for ``layout.meta.pos`` (computed here, in float64, if omitted);
  mask: an override of the streaming mask, (N, N) or per sequence (B, N, N) (training dropout).
  Returns the velocity (B, n_noisy * chunk, C).
  """
  cfg = model.cfg
  cs = cfg.chunk
  b = noisy.shape[0]
  n_noisy = len(layout.noisy_chunks)
  h_clean = model.embed_clean(clean, clean_extra)
  h_noisy = model.embed_noisy(noisy, noisy_extra).reshape(b, n_noisy, cs, -1)
  g = jax.vmap(lambda tt: model.embed_global(global_embed, tt), in_axes=1, out_axes=1)(t)
  h = jnp.concatenate([h_noisy, g[:, :, None]], axis=2).reshape(b, n_noisy * (cs + 1), -1)
  h = jnp.concatenate([h_clean, h], axis=1)
  if mask is None:
    mask = A.streaming_mask(layout.meta, layout.meta, cfg.context_chunks)
  if rope is None:
    rope = A.rope_tables(model.inv_freq[...], layout.meta.pos)
  out, _ = model.forward_tokens(h, rope, mask, cross, exit_layer=exit_layer)
  if exit_layer is not None:
    return out
  out = out[:, layout.n_clean * cs:].reshape(b, n_noisy, cs + 1, -1)[:, :, :cs]
  return model.velocity(out.reshape(b, n_noisy * cs, -1))
