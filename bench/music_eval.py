"""What a model's music sounds like, by measurable properties: one table of the music targets of
issue 15, one column per model, each row with its target and pass/fail. Writes
<out>/music_eval.json and some of the generated WAVs.

Streams (every model gets the same ones; everything through ``lmdm_jax.load_system``):
  A. prompt streams: ``--prompts`` held-out captions (the corpus's held-out pieces with
     ``--data``, else the recorded held-out tracks') with their key and tempo replaced by others
     (so the model must read them from the text), each streamed twice from silence with two noise
     draws (two rows of one batch), ``--seconds`` long;
  B. context streams: ``--recorded`` held-out tracks (whole works the model never saw), each
     primed with ``--context-seconds`` of its latents (``Stream.prime``) and continued for
     ``--seconds`` under the track's caption;
  C. jam: a held-out recorded track (or a corpus stem with ``--data``) as the partner in the
     accompaniment channels, ``--jam-seconds`` long;
  D. sketch (with ``--data`` only): the held-out pieces' melodies as the sketch.

Targets (``music_metrics`` defines each measure; levels and clipping on the decoder's raw float
output, no limiter):
  windows > -6 dBFS (A+B, share of 5-s windows)         0
  near-silent windows < -50 dBFS (A+B)                  <= 0.05
  level std over 5-s windows (A+B, mean over streams)   <= 3 dB
  clipped samples |x| >= 1 (A+B, total)                 0
  context chroma r, first 10 s vs context (B)          >= 0.3
  jam agreement, true / time-shuffled partner (C)      >= 1.5 (n/a unless both are > 0)
  between-seed chroma distance (A pairs)               >= 0.3
  harmonic motion between 1-s windows (A+B)            >= 0.1
  key exactly as prompted (A)                          >= 0.35
  tempo within 8 % (A; octave errors folded)           >= 0.5
  sketch adherence, chroma share (D)                   >= 0.26
The ``real`` column measures the same on the recorded held-out tracks themselves (their latents
decoded; the true continuation of each context), where a measure applies.

The issue's setting is the default: 8 prompts x 2 draws + 8 recorded contexts = 24 streams of
120 s. ``--quick``: 1 prompt x 2 + 1 context, 10 s (smoke runs).

  python3 bench/music_eval.py --checkpoint lmdm_jax/assets/demo_model.npz \\
      --recorded data_cache/latents_recorded
  python3 bench/music_eval.py --checkpoint prev=old.npz --checkpoint new=runs/new \\
      --recorded data_cache/latents_recorded --data data_cache/latents_spectral
A checkpoint ``config:NAME`` builds that config with random weights (pipeline smoke tests).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from lmdm_jax import music_metrics as M  # noqa: E402

KEYS = ["C major", "D major", "Eb major", "F major", "G major", "A minor", "D minor", "Bb major",
        "E minor", "A major", "C minor", "G minor"]
TEMPI = [60, 72, 84, 96, 108, 120]
WITHIN_8PCT = float(np.log2(1.08))

# (name, target text, pass test, how the value prints)
TARGETS = [
    ("loud", "windows > -6 dBFS", "0", lambda v: v == 0, "{:.2f}"),
    ("silent", "near-silent windows (< -50 dBFS)", "<= 0.05", lambda v: v <= 0.05, "{:.2f}"),
    ("level_std", "level std over 5-s windows, dB", "<= 3", lambda v: v <= 3, "{:.2f}"),
    ("clipped", "clipped samples (|x| >= 1, raw)", "0", lambda v: v == 0, "{:.0f}"),
    ("context_r", "chroma r, first 10 s vs context", ">= 0.3", lambda v: v >= 0.3, "{:.3f}"),
    ("jam_ratio", "jam agreement: true / shuffled", ">= 1.5", lambda v: v >= 1.5, "{:.2f}"),
    ("seed_distance", "between-seed chroma distance", ">= 0.3", lambda v: v >= 0.3, "{:.3f}"),
    ("motion", "harmonic motion (1-s windows)", ">= 0.1", lambda v: v >= 0.1, "{:.3f}"),
    ("key_exact", "key exactly as prompted", ">= 0.35", lambda v: v >= 0.35, "{:.2f}"),
    ("tempo_8pct", "tempo within 8%", ">= 0.5", lambda v: v >= 0.5, "{:.2f}"),
    ("sketch_share", "sketch adherence (chroma share)", ">= 0.26", lambda v: v >= 0.26, "{:.3f}"),
]


def _restyle(caption: str, key: str, bpm: int) -> str:
  """The caption with its key and tempo replaced (appended where it names none)."""
  c, n = re.subn(r"\b[A-G][b#-]? (major|minor)\b", key, caption)
  if not n:
    c = f"{c.rstrip()} {key}."
  c, n = re.subn(r"\b\d+ BPM\b", f"{bpm} BPM", c)
  if not n:
    c = f"{c.rstrip()} {bpm} BPM."
  return c


def _load(spec, log):
  from lmdm_jax.system import load_system
  label, path = spec.split("=", 1) if "=" in spec else (os.path.basename(spec.rstrip("/")), spec)
  if path.startswith("config:"):
    return label, load_system(config=path[len("config:"):], log=lambda m: log(f"[eval] {m}"))
  return label, load_system(path, log=lambda m: log(f"[eval] {m}"))


class Generator:
  """Batched streaming of B prompts through a System's model, conditioning and codec (one
  compiled stream per batch size and length); decoded audio is the codec's raw float output."""

  def __init__(self, system, steps=None, cfg_scale=None, seed=0):
    self.system, self.seed = system, seed
    self.settings = system.sampler_settings(steps=steps, cfg_scale=cfg_scale, plus_plus=False)

  def __call__(self, captions, frames, extra=None, context=None):
    """Latents (B, frames, C) of ``captions``; ``extra`` (B, >= frames, E) channels; ``context``
    (B, n * chunk, C) latents to prime the stream with."""
    from lmdm_jax import sampling as S
    sys_, st = self.system, self.settings
    cfg = sys_.cfg
    b = len(captions)
    stream = S.Stream(sys_.model, batch=b, cross_len=sys_.cross_len, seed=self.seed,
                      regime=st.regime, cfg_guidance=st.cfg_scale != 1.0,
                      sampler=S.SamplerParams.make(st.steps, st.cfg_scale, False, st.pingpong))
    stream.set_prompt(*sys_.conditioner(list(captions), sys_.seconds_start,
                                        sys_.seconds_total or 0.0))
    if context is not None:
      stream.prime(context)
    n = -(-frames // cfg.chunk) * cfg.chunk
    if extra is not None:
      extra = extra[:, :n]
      if extra.shape[1] < n:
        extra = np.pad(extra, ((0, 0), (0, n - extra.shape[1]), (0, 0)))
    return np.asarray(stream.generate(n, extra))[:, :frames]

  def decode(self, latents):
    return np.asarray(self.system.codec.decode(latents))[0]


# ------------------------------------------------------------------------------- the streams


def recorded_items(rec, n, context_s, seconds, fr, chunk):
  """Up to ``n`` held-out recorded tracks long enough for a context and a continuation:
  (caption, context latents, true continuation latents), the context starting 10 s in."""
  _, held = rec.split()
  ctx = int(context_s * fr) // chunk * chunk
  if ctx < chunk:
    raise SystemExit(f"music_eval.py: error: --context-seconds {context_s:g} is shorter than one "
                     f"block ({chunk / fr:.2f} s)")
  off, cont = int(10 * fr), int(np.ceil(seconds * fr))
  items = []
  for i in held:
    z = rec.latents(i).astype(np.float32)
    if len(z) < ctx + min(cont, int(10 * fr)):
      continue
    o = int(np.clip(len(z) - ctx - cont, 0, off))
    items.append((rec.records[i]["caption"], z[o:o + ctx], z[o + ctx:o + ctx + cont]))
  step = max(1, len(items) // max(n, 1))  # spread over the packages (held is in their order)
  return (items[::step] + items)[:n] if items else []


def stream_stats(a, sr):
  st = M.loudness_stability(a, sr)
  return dict(loud=st["loud_windows"], silent=st["silent_windows"], level_std=st["std_db"],
              clipped=M.clipped_samples(a), motion=M.harmonic_motion(a, sr))


def _mean(xs):
  xs = [x for x in xs if x is not None and np.isfinite(x)]
  return float(np.mean(xs)) if xs else float("nan")


def summarize(rows):
  """Per-stream stats -> the level/clipping/motion target values."""
  if not rows:
    return {}
  return dict(loud=_mean([r["loud"] for r in rows]), silent=_mean([r["silent"] for r in rows]),
              level_std=_mean([r["level_std"] for r in rows]),
              clipped=float(sum(r["clipped"] for r in rows)),
              motion=_mean([r["motion"] for r in rows]))


def evaluate(label, system, args, prompts, truth, recorded, partners, corpus, log=print):
  from lmdm_jax.data.audio import save_audio
  from lmdm_jax.training.data import extra_groups
  codec, cfg = system.codec, system.cfg
  gen = Generator(system, args.steps, args.cfg_scale, args.seed)
  sr, fr = codec.sample_rate, codec.frame_rate
  out_dir = os.path.join(args.out, label)
  os.makedirs(out_dir, exist_ok=True)
  frames = int(np.ceil(args.seconds * fr))  # at least the seconds (whole 5-s level windows)
  res, streams = {}, []
  t0 = time.perf_counter()

  def keep(name, a):
    if len(os.listdir(out_dir)) < args.keep_wavs:
      save_audio(os.path.join(out_dir, name), np.clip(a, -1, 1)[None], sr)

  # A. prompt streams, two noise draws each
  if prompts:
    lat = gen([p for p in prompts for _ in (0, 1)], frames)
    audio = [gen.decode(z) for z in lat]
    for j, a in enumerate(audio):
      keep(f"prompt_{j // 2:02d}_{j % 2}.wav", a)
      streams.append(stream_stats(a, sr))
    keys = [M.estimate_key(a, sr) for a in audio]
    tempi = [M.estimate_tempo(a, sr) for a in audio]
    tr = [t for t in truth for _ in (0, 1)]
    rel = [M.key_relation(k, t[:2]) for k, t in zip(keys, tr)]
    terr = [M.tempo_error(e, t[2]) for e, t in zip(tempi, tr)]
    res["key_exact"] = float(np.mean([x == "exact" for x in rel]))
    res["key_exact_or_related"] = float(np.mean([x != "other" for x in rel]))
    res["tempo_8pct"] = float(np.mean([e < WITHIN_8PCT for e in terr]))
    res["seed_distance"] = _mean([M.chroma_distance(audio[2 * j], audio[2 * j + 1], sr)
                                  for j in range(len(prompts))])
    res["prompt_items"] = [dict(prompt=prompts[j // 2], draw=j % 2, key=f"{M.NAMES[k[0]]} {k[1]}",
                                bpm=e, key_relation=x)
                           for j, (k, e, x) in enumerate(zip(keys, tempi, rel))]
    log(f"[eval] {label}: {len(audio)} prompt streams done ({time.perf_counter() - t0:.0f} s)")

  # B. continuations of held-out recorded contexts
  if recorded:
    ctx = np.stack([c for _, c, _ in recorded])
    lat = gen([cap for cap, _, _ in recorded], frames, context=ctx)
    rs = []
    for j, (z, c) in enumerate(zip(lat, ctx)):
      a = gen.decode(z)
      keep(f"context_{j:02d}.wav", a)
      streams.append(stream_stats(a, sr))
      rs.append(M.context_correlation(a, gen.decode(c), sr))
    res["context_r"] = _mean(rs)
    log(f"[eval] {label}: {len(lat)} context streams done ({time.perf_counter() - t0:.0f} s)")
  res.update(summarize(streams))
  res["per_stream"] = streams  # prompt streams (2 draws each), then context streams
  res["streams"] = len(streams)

  accomp, sketch = extra_groups(cfg)
  E, C = cfg.extra_dim, cfg.io_channels
  jf = int(np.ceil(args.jam_seconds * fr))
  # C. jam: the partner in the accompaniment channels; agreement vs a time-shuffled partner
  if accomp and partners:
    ex = np.zeros((len(partners), jf, E), np.float32)
    for j, (_, p) in enumerate(partners):
      p = p[:jf]
      ex[j, :len(p), 0] = 1.0
      ex[j, :len(p), 1:1 + C] = p
    lat = gen([cap for cap, _ in partners], jf, ex)
    true, shuf = [], []
    for j, z in enumerate(lat):
      a, p = gen.decode(z), gen.decode(partners[j][1][:jf])
      n = min(len(a), len(p))
      keep(f"jam_{j:02d}.wav", a)
      true.append(M.chroma_agreement(a[:n], p[:n], sr))
      shuf.append(M.chroma_agreement(a[:n], M.shuffle_windows(p[:n], sr), sr))
    res["jam_true"], res["jam_shuffled"] = _mean(true), _mean(shuf)
    # a ratio of two correlations means something only when both are positive; otherwise it is
    # undefined (n/a, not a pass: e.g. 0.013 vs -0.009 is no agreement at all)
    ok = res["jam_true"] > 0 and res["jam_shuffled"] > 0
    res["jam_ratio"] = res["jam_true"] / res["jam_shuffled"] if ok else float("nan")
    res["jam_n"] = len(partners)
    log(f"[eval] {label}: jam done ({time.perf_counter() - t0:.0f} s)")

  # D. sketch adherence (corpus melodies; same prompt and seed with and without the sketch)
  if sketch and corpus is not None and corpus["melodies"]:
    from lmdm_jax.data.sketch import SKETCH_DIM, pitch_features
    caps, mel = zip(*corpus["melodies"])
    ex = np.zeros((len(caps), jf, E), np.float32)
    for j, m in enumerate(mel):
      m = np.pad(m[:jf], (0, max(0, jf - len(m))), constant_values=np.nan)
      ex[j, :, E - SKETCH_DIM:] = pitch_features(m)
    with_s, without = gen(list(caps), jf, ex), gen(list(caps), jf, np.zeros_like(ex))
    share = [M.sketch_adherence(gen.decode(z), sr, codec.hop, np.asarray(m[:jf], float))["share"]
             for z, m in zip(with_s, mel)]
    share0 = [M.sketch_adherence(gen.decode(z), sr, codec.hop, np.asarray(m[:jf], float))["share"]
              for z, m in zip(without, mel)]
    res["sketch_share"], res["sketch_share_without"] = _mean(share), _mean(share0)
    log(f"[eval] {label}: sketch done ({time.perf_counter() - t0:.0f} s)")
  res["seconds_to_run"] = time.perf_counter() - t0
  return res


def real_reference(recorded, codec):
  """The measures on the recorded held-out tracks themselves (their latents decoded)."""
  if not recorded:
    return {}
  rows, rs = [], []
  for _, c, cont in recorded:
    a, ctx = np.asarray(codec.decode(cont))[0], np.asarray(codec.decode(c))[0]
    rows.append(stream_stats(a, codec.sample_rate))
    rs.append(M.context_correlation(a, ctx, codec.sample_rate))
  res = summarize(rows)
  res.update(context_r=_mean(rs), streams=len(rows))
  return res


def corpus_sets(path, n, seconds, fr):
  """Held-out corpus captions (with key and tempo metadata) and melodies, or None."""
  from lmdm_jax.data.dataset import LatentDataset
  if not path or not os.path.exists(os.path.join(path, "dataset.json")):
    return None
  ds = LatentDataset(path, 16)
  _, held = ds.split()
  caps = [ds.records[i]["caption"] for i in held]
  frames = int(seconds * fr)
  mel = [(ds.records[i]["caption"], ds.melody[ds.records[i]["key"]][:frames])
         for i in held if ds.melody is not None and ds.records[i]["key"] in ds.melody][:n]
  stems = []
  for i in held:
    if len(ds.records[i]["stems"]) >= 2 and len(stems) < n:
      name = ds.records[i]["stems"][0].get("name", "solo")
      stems.append((f"{name[:1].upper()}{name[1:]} part. {ds.records[i]['caption']}",
                    ds.stem_latents(i)[1][:frames].astype(np.float32)))
  return dict(captions=caps, melodies=mel, stems=stems)


def table(results, labels, args, counts) -> str:
  cols = ["real"] + labels
  w = max(10, *(len(c) + 6 for c in cols))
  lines = [f"{counts}", "",
           f"{'target':<34} {'goal':>8} " + " ".join(f"{c:>{w}}" for c in cols)]
  for key, name, goal, ok, fmt in TARGETS:
    cells = []
    for c in cols:
      v = results.get(c, {}).get(key)
      if v is None or (c == "real" and np.isnan(v)):
        cells.append(f"{'-':>{w}}")
      elif np.isnan(v):  # measured, but undefined (e.g. no positive agreement): not a pass
        cells.append(f"{'n/a FAIL':>{w}}")
      elif c == "real":
        cells.append(f"{fmt.format(v):>{w}}")
      else:
        cells.append(f"{fmt.format(v) + (' pass' if ok(v) else ' FAIL'):>{w}}")
    lines.append(f"{name:<34} {goal:>8} " + " ".join(cells))
  for c in labels:
    r = results[c]
    extra = []
    if "jam_true" in r:
      extra.append(f"jam agreement {r['jam_true']:.3f} true vs {r['jam_shuffled']:.3f} shuffled "
                   f"({r['jam_n']} streams of {args.jam_seconds:g} s)")
    if "sketch_share_without" in r:
      extra.append(f"sketch share {r['sketch_share']:.3f} vs {r['sketch_share_without']:.3f} "
                   "without the sketch")
    if "key_exact_or_related" in r:
      extra.append(f"key exact or related {r['key_exact_or_related']:.2f}")
    if extra:
      lines.append(f"  {c}: " + "; ".join(extra))
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--checkpoint", action="append", required=True,
                  help="[label=]source: a bundle .npz, a train.py work directory, or config:NAME "
                       "(random weights) (repeatable: one column each)")
  ap.add_argument("--recorded", default=None, metavar="DIR",
                  help="the recorded-music latents (python3 -m lmdm_jax.data.dataset on "
                       "lmdm_jax.data.recorded's audio): held-out contexts and jam partners")
  ap.add_argument("--data", default=None, metavar="DIR",
                  help="the rendered corpus's latents: held-out captions, melodies (sketch) and "
                       "stems (jam partners)")
  ap.add_argument("--out", default="runs/music_eval")
  ap.add_argument("--prompts", type=int, default=8, help="prompts, each streamed with 2 draws")
  ap.add_argument("--contexts", type=int, default=8, help="recorded held-out contexts")
  ap.add_argument("--seconds", type=float, default=120.0, help="length of every stream")
  ap.add_argument("--context-seconds", type=float, default=10.0)
  ap.add_argument("--jam-seconds", type=float, default=30.0)
  ap.add_argument("--quick", action="store_true",
                  help="smoke setting: 1 prompt x 2 draws + 1 context, 10-s streams")
  ap.add_argument("--keep-wavs", type=int, default=64, help="WAVs written per model (clipped "
                                                             "to full scale, as a player hears)")
  ap.add_argument("--steps", type=int)
  ap.add_argument("--cfg-scale", type=float)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  if args.quick:
    args.prompts, args.contexts, args.seconds, args.jam_seconds = 1, 1, 10.0, 10.0
    args.context_seconds = min(args.context_seconds, 5.0)
  for name in ("prompts", "contexts"):
    if getattr(args, name) < 0:
      ap.error(f"--{name} must be >= 0")
  for name in ("seconds", "context_seconds", "jam_seconds"):
    if not getattr(args, name) >= 5:
      ap.error(f"--{name.replace('_', '-')} must be at least 5 (one level window)")
  if args.recorded and not os.path.exists(os.path.join(args.recorded, "dataset.json")):
    ap.error(f"--recorded {args.recorded}: no dataset.json there (a latents folder from "
             "python3 -m lmdm_jax.data.dataset)")
  os.makedirs(args.out, exist_ok=True)

  models = [_load(s, print) for s in args.checkpoint]
  system0 = models[0][1]
  fr, chunk = system0.frame_rate, system0.cfg.chunk
  for label, s in models:
    if s.codec is None:
      ap.error(f"{label}: the model has no codec to decode its latents")
  recorded, partners = [], []
  if args.recorded:
    from lmdm_jax.data.dataset import LatentDataset
    rec = LatentDataset(args.recorded, 16)
    if int(rec.info.get("latent_dim", -1)) != system0.cfg.io_channels or \
        abs(float(rec.info.get("frame_rate", 0)) - fr) > 1e-6:
      ap.error(f"--recorded {args.recorded}: its latents ({rec.info.get('latent_dim')} dims at "
               f"{rec.info.get('frame_rate')} fps) are not this model's codec's "
               f"({system0.cfg.io_channels} at {fr})")
    recorded = recorded_items(rec, args.contexts, args.context_seconds, args.seconds, fr, chunk)
    partners = [(cap, np.concatenate([c, cont])) for cap, c, cont in recorded]
  corpus = corpus_sets(args.data, args.prompts, args.jam_seconds, fr)
  if corpus is not None and corpus["stems"]:
    partners = corpus["stems"]
  captions = corpus["captions"] if corpus else [cap for cap, _, _ in recorded]
  if not captions and args.recorded:
    _, held = rec.split()
    captions = [rec.records[i]["caption"] for i in held]
  if not captions:
    ap.error("no held-out captions: give --recorded or --data")
  prompts, truth = [], []
  for j in range(args.prompts):
    key, bpm = KEYS[j % len(KEYS)], TEMPI[j % len(TEMPI)]
    prompts.append(_restyle(captions[j % len(captions)], key, bpm))
    tonic, mode = key.split()
    truth.append((M.pitch_class(tonic), mode, bpm))

  results = {"real": real_reference(recorded, system0.codec)}
  labels = []
  for label, system in models:
    results[label] = evaluate(label, system, args, prompts, truth, recorded, partners, corpus)
    labels.append(label)
  n_streams = 2 * len(prompts) + len(recorded)
  counts = (f"music targets: {n_streams} streams of {args.seconds:g} s ({len(prompts)} held-out "
            f"prompts x 2 noise draws from silence + {len(recorded)} held-out recorded contexts "
            f"of {args.context_seconds:g} s); jam {len(partners) if partners else 0} x "
            f"{args.jam_seconds:g} s; 'real' = the recorded held-out continuations")
  text = table(results, labels, args, counts)
  print("\n" + text)
  with open(os.path.join(args.out, "music_eval.json"), "w") as f:
    json.dump(dict(results=results, table=text, args=vars(args)), f, indent=1, default=float)
  print(f"\nwrote {os.path.join(args.out, 'music_eval.json')} and WAVs under {args.out}/")


if __name__ == "__main__":
  main()
