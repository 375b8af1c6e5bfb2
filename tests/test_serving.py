"""Batched serving (lmdm_jax/serving.py): every slot's output equals the same stream or jam run
alone, for a mix of prompts, step counts, CFG scales, seeds and delays in one batched step; joins,
leaves, prompt and sampler changes compile nothing; the live sampler thread batches jams."""

import jax
import numpy as np
import pytest

from lmdm_jax import sampling as S
from lmdm_jax import serving
from lmdm_jax.config import DiTConfig, load_config_file
from lmdm_jax.testing import random_model, rel_err
from tests.test_jam import FakeClock, acc_config, wait_for

pytestmark = pytest.mark.slow  # each test compiles several block steps (10 s and more)

TOL = 1e-5


@pytest.fixture(scope="module")
def system(tmp_path_factory):
  """A System: a random tiny model with accompaniment channels + the spectral codec."""
  from lmdm_jax import sources
  conf = load_config_file(str(acc_config(tmp_path_factory.mktemp("serve"))))
  cfg = DiTConfig.from_config(conf.model)
  return sources.assemble(random_model(cfg, seed=0), conf, codec="spectral",
                          log=lambda *_: None)


@pytest.fixture(scope="module")
def slots(system):
  srv = serving.SlotServer(system, slots=5)
  srv.pool(True), srv.pool(False)  # both kinds compiled up front
  yield srv
  srv.close()


def partner_audio(system, seconds, f0):
  sr = system.codec.sample_rate
  t = np.arange(int(seconds * sr)) / sr
  return (0.3 * np.sin(2 * np.pi * f0 * t) * (1 + np.sin(2 * np.pi * 1.5 * t))
          ).astype(np.float32)[None]


class CompileCounter:
  """Counts JAX tracing and XLA compilation events while active (jax.monitoring)."""

  EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")

  def __init__(self):
    self.events, self.on = [], False
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kw):
    if self.on and event in self.EVENTS:
      self.events.append(event)


COUNTER = CompileCounter()


def capture_latents(sess):
  """Records every block's latents a JamSession decodes (in ``sess.latents``)."""
  sess.latents, emit = [], sess._emit
  sess._emit = lambda k, blk: (sess.latents.append(np.array(blk)), emit(k, blk))[1]
  return sess


def test_slot_streams_equal_lone_streams_on_the_model():
  """The model level: two slots with their own prompt, seed, steps and CFG scale,
  one joining a block late and idle for a block, equal two ``sampling.Stream``s to 1e-5."""
  model = random_model("tiny", seed=0)
  cfg = model.cfg
  cond = [np.random.default_rng(i).standard_normal((1, 3, cfg.cond_token_dim)).astype(np.float32)
          for i in range(2)]
  glob = [np.random.default_rng(9 + i).standard_normal((1, cfg.global_cond_dim)).astype(np.float32)
          if cfg.global_cond_dim else None for i in range(2)]
  sps = [S.SamplerParams.make(2, 2.0), S.SamplerParams.make(3, 1.5, plus_plus=True)]
  alone = []
  for i in range(2):
    st = S.Stream(model, cfg_guidance=True, cross_len=3, seed=i + 1, sampler=sps[i])
    st.set_prompt(cond[i], glob[i])
    alone.append(np.stack([np.asarray(st.next_block())[0] for _ in range(3)]))
  pool = serving.SlotStreams(model, 2, cfg_guidance=True, cross_len=3)
  pool.join(0, cond[0], glob[0], seed=1, sampler=sps[0])
  got = [[], []]
  got[0].append(pool.step(active=[True, False])[0])
  pool.join(1, cond[1], glob[1], seed=2, sampler=sps[1])
  for act in ([True, True], [False, True], [True, True]):
    blocks = pool.step(active=act)
    for i in range(2):
      if act[i]:
        got[i].append(blocks[i])
  errs = [rel_err(np.stack(g), a) for g, a in zip(got, alone)]
  assert max(errs) < TOL, errs
  assert rel_err(alone[0], alone[1]) > 1e-2


def test_text_and_jam_slots_equal_lone_sessions(system, slots):
  """Three text streams (guided and not, 1-3 steps, a prompt change, a step change) and two jam
  sessions (delays 1 and 2) share the batched steps; one text stream leaves midway and a new
  one joins its slot. Each equals the same stream / session run alone to 1e-5."""
  n = 5
  specs = [dict(prompt="solo piano", seed=1, steps=3, cfg_scale=2.5),
           dict(prompt="drums", seed=2, steps=2, cfg_scale=1.0),
           dict(prompt="strings", seed=3, steps=1, cfg_scale=1.5)]
  jam_specs = [dict(prompt="a duet", delay_blocks=2, steps=2, cfg_scale=1.0, seed=4),
               dict(prompt="bass line", delay_blocks=1, steps=3, cfg_scale=2.0, seed=5)]
  partners = [partner_audio(system, 1.2, 220.0), partner_audio(system, 0.9, 330.0)]
  late = dict(prompt="late joiner", seed=6, steps=2, cfg_scale=1.0)

  # alone
  def lone_text(spec, blocks, change=None):
    st = system.stream(spec["prompt"], seed=spec["seed"], steps=spec["steps"],
                       cfg_scale=spec["cfg_scale"], decode=False)
    out = []
    for k in range(blocks):
      if change and k == change[0]:
        change[1](st)
      out.append(st.next_block())
    return np.stack(out)

  def prompt_change(st):
    st.set_prompt("string quartet, lively")

  def step_change(st):
    st.stream.set_sampler(steps=4)

  alone = [lone_text(specs[0], n, (2, prompt_change)), lone_text(specs[1], 2),
           lone_text(specs[2], n, (3, step_change))]
  alone_late = lone_text(late, 3)
  lone_jams = [capture_latents(system.jam(**s)) for s in jam_specs]
  alone_jams = [sess.render(p) for sess, p in zip(lone_jams, partners)]

  # together: five slots, all taken until the second text stream leaves after two blocks and
  # the late joiner takes its slot
  texts = [slots.open_stream(s["prompt"], seed=s["seed"], steps=s["steps"],
                             cfg_scale=s["cfg_scale"], decode=False) for s in specs]
  jams = [capture_latents(system.jam(server=slots, **s)) for s in jam_specs]
  with pytest.raises(serving.SlotsFull, match="all 5 slots are taken"):
    slots.open_stream("one too many")
  got, got_late, lt = [[] for _ in specs], [], None
  for sess, p in zip(jams, partners):
    sess.render_begin(p)
  k = 0
  while k < n or any(s.render_pending() for s in jams):
    if k == 2:
      texts[0].set_prompt("string quartet, lively")
      texts[1].close()
      lt = slots.open_stream(late["prompt"], seed=late["seed"], steps=late["steps"],
                             cfg_scale=late["cfg_scale"], decode=False)
    if k == 3:
      texts[2].stream.set_sampler(steps=4)
    items, who = [], []
    for i, t in enumerate(texts):
      if k < len(alone[i]):
        items.append((t.stream, None))
        who.append(("text", i))
    if lt is not None and len(got_late) < 3:
      items.append((lt.stream, None))
      who.append(("late", 0))
    for j, sess in enumerate(jams):
      if sess.render_pending():
        items.append((sess.stream, sess.render_input()))
        who.append(("jam", j))
    for (kind, i), blk in zip(who, slots.step(items)):
      if kind == "text":
        got[i].append(texts[i].take_block(blk))
      elif kind == "late":
        got_late.append(lt.take_block(blk))
      else:
        jams[i].render_output(blk, 0.0)
    k += 1
  together_jams = [s.render_result() for s in jams]
  for t in jams + texts + [lt]:
    t.close()
  assert slots.in_use == 0

  errs = [rel_err(np.stack(g), a) for g, a in zip(got, alone)]
  errs.append(rel_err(np.stack(got_late), alone_late))
  errs += [rel_err(np.stack(t.latents), np.stack(a.latents)) for t, a in zip(jams, lone_jams)]
  print("slot vs alone, rel err:", ", ".join(f"{e:.1e}" for e in errs))
  assert max(errs) < TOL, errs
  # the decoded parts: the codec's Griffin-Lim (momentum 0.99, phases from angles) amplifies
  # float32 rounding of the latents to about 1e-3 of the audio
  audio = [rel_err(t, a) for t, a in zip(together_jams, alone_jams)]
  print("jam audio, slot vs alone, rel err:", ", ".join(f"{e:.1e}" for e in audio))
  assert max(audio) < 2e-2, audio
  # the settings matter (the comparison would not notice a slot running another's settings)
  assert rel_err(alone[0][2:], lone_text(specs[0], n)[2:]) > 1e-3  # the prompt change
  assert rel_err(alone[2][3:], lone_text(specs[2], n)[3:]) > 1e-3  # the step change
  assert rel_err(alone[1], lone_text(dict(specs[1], seed=9), 2)) > 1e-3
  assert np.abs(alone_jams[0]).max() > 0 and np.abs(alone_jams[1]).max() > 0


def test_joins_leaves_and_changes_compile_nothing(system, slots):
  warm = slots.open_stream("warm up", seed=0, steps=2, cfg_scale=2.0, decode=False)
  warm.next_block()
  warm.set_prompt("warm up again")
  warm.close()
  warm = slots.open_stream("warm up", seed=0, steps=2, cfg_scale=1.0, decode=False)
  warm.next_block()
  warm.close()
  before = sum(p.compiles for p in slots.pools.values())
  COUNTER.on = True
  try:
    a = slots.open_stream("one", seed=11, steps=3, cfg_scale=3.0, decode=False)
    b = slots.open_stream("two", seed=12, steps=1, cfg_scale=1.0, decode=False)
    slots.step([(a.stream, None), (b.stream, None)])
    a.set_prompt("one, changed")
    a.stream.set_sampler(steps=5, cfg_scale=1.5)
    b.close()
    c = slots.open_stream("three", seed=13, steps=4, cfg_scale=1.0, decode=False)
    slots.step([(a.stream, None), (c.stream, None)])
    a.close()
    c.close()
    d = slots.open_stream("four", seed=14, steps=2, cfg_scale=2.0, decode=False)
    d.next_latents()
    d.close()
  finally:
    COUNTER.on = False
  assert COUNTER.events == [], COUNTER.events
  assert sum(p.compiles for p in slots.pools.values()) == before
  # the counter does count: a new program is seen
  COUNTER.on = True
  try:
    jax.jit(lambda x: x * 3 + 1)(np.float32(2))
  finally:
    COUNTER.on = False
  assert COUNTER.events, "the compile counter saw nothing"
  COUNTER.events.clear()


def test_live_sampler_thread_batches_jams_on_the_block_clock(system, slots):
  """Two live jams on the server's sampler thread (a fake clock): blocks come on their ticks,
  due sessions share one batched step, output comes back, close frees the slots."""
  clock = FakeClock()
  srv = serving.SlotServer(system, slots=2, clock=clock)
  try:
    a = system.jam("a", server=srv, delay_blocks=1, steps=2, cfg_scale=1.0, clock=clock)
    b = system.jam("b", server=srv, delay_blocks=2, steps=1, cfg_scale=1.0, clock=clock, seed=1)
    with pytest.raises(serving.SlotsFull):
      system.jam("c", server=srv)
    sr, B = system.codec.sample_rate, a.block_seconds
    a.push(partner_audio(system, 2.0, 220.0))
    b.push(partner_audio(system, 2.0, 330.0))
    assert a._t0 == b._t0 == 0.0
    assert wait_for(lambda: a.blocks >= 1 or a._error is not None)  # a's block 0 is due at 0
    a._raise()
    assert b.blocks == 0
    ticks = srv.ticks
    clock.set(B)  # a's block 1 and b's block 0: one batched step
    assert wait_for(lambda: (a.blocks >= 2 and b.blocks >= 1) or a._error or b._error)
    a._raise(), b._raise()
    assert srv.ticks == ticks + 1
    clock.set(6 * B)
    assert wait_for(lambda: (a.blocks >= 7 and b.blocks >= 6) or a._error or b._error)
    y = a.pull(a.delay_samples + sr // 2)
    assert np.abs(y[:, a.delay_samples:]).max() > 0
    a.close()
    b.close()
    assert srv.in_use == 0
  finally:
    srv.close()
