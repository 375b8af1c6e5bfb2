"""What a trained model's music sounds like, by measurable properties (training issue item 8;
sketch adherence for the applications issue). Prints tables; writes <out>/music_eval.json and
the generated WAVs.

1. Prompted key and tempo: the held-out captions with their key and tempo replaced by others
   (so the model must read them from the text), streamed from silence; key estimated from the
   output (Krumhansl-Kessler on chroma), tempo by beat tracking (octave errors folded). Chance
   level: the same outputs scored against the other prompts' keys. Upper bound: the estimators
   on the real held-out recordings against their true metadata.
2. Loudness stability over a long stream (default 120 s): RMS level per 5 s window.
3. Sketch adherence: held-out pieces' melodies (skyline of their stems, ``data/melody.py``) as
   the sketch, vs the same prompt and seed without a sketch: share of chroma energy in the
   sketch's pitch class (chance 1/12) and top-1 pitch-class rate.
4. Jamming: a held-out stem as the partner (accompaniment channels), vs none: chroma agreement
   between the generated part and the partner.

  python3 bench/music_eval.py --checkpoint lmdm_jax/assets/demo_model.npz
  python3 bench/music_eval.py --checkpoint base=runs/demo --checkpoint arc=runs/arc_demo/merged.npz
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


def _restyle(caption: str, key: str, bpm: int) -> str:
  c = re.sub(r"\b[A-G][b#-]? (major|minor)\b", key, caption)
  c = re.sub(r"\b\d+ BPM\b", f"{bpm} BPM", c)
  return c


def _load(spec, log):
  from lmdm_jax.system import load_system
  label, path = spec.split("=", 1) if "=" in spec else (os.path.basename(spec.rstrip("/")), spec)
  return label, load_system(path, log=lambda m: log(f"[eval] {m}"))


class Generator:
  """Batched streaming of B prompts through a System's model and conditioning (one compiled
  stream per batch size and length)."""

  def __init__(self, system, steps=None, cfg_scale=None, seed=0):
    self.system, self.seed = system, seed
    self.settings = system.sampler_settings(steps=steps, cfg_scale=cfg_scale, plus_plus=False)

  def __call__(self, captions, frames, extra=None):
    from lmdm_jax import sampling as S
    sys_, st = self.system, self.settings
    cfg = sys_.cfg
    b = len(captions)
    stream = S.Stream(sys_.model, batch=b, cross_len=sys_.cross_len, seed=self.seed,
                      cfg_guidance=st.cfg_scale != 1.0,
                      sampler=S.SamplerParams.make(st.steps, st.cfg_scale, False, st.pingpong))
    stream.set_prompt(*sys_.conditioner(list(captions), sys_.seconds_start,
                                        sys_.seconds_total or 0.0))
    n = -(-frames // cfg.chunk) * cfg.chunk
    if extra is not None and extra.shape[1] < n:
      extra = np.pad(extra, ((0, 0), (0, n - extra.shape[1]), (0, 0)))
    return np.asarray(stream.generate(n, extra))[:, :frames]


def _real_audio(audio_root, rel, seconds, sr, offset=0.0):
  from lmdm_jax.data.audio import load_audio
  x = load_audio(os.path.join(audio_root, rel), sample_rate=sr, channels=1)[0]
  s = int(offset * sr)
  return x[s:s + int(seconds * sr)]


def evaluate(label, system, args, held, ds, log=print):
  from lmdm_jax.data.sketch import SKETCH_DIM, pitch_features
  from lmdm_jax.data.audio import save_audio
  from lmdm_jax.training.data import extra_groups
  codec, cfg = system.codec, system.cfg
  gen = Generator(system, args.steps, args.cfg_scale, args.seed)
  sr, fr = codec.sample_rate, codec.frame_rate
  out_dir = os.path.join(args.out, label)
  os.makedirs(out_dir, exist_ok=True)
  res = {}
  t0 = time.perf_counter()

  # 1. key and tempo from the prompt
  prompts, truth = [], []
  for j in range(args.prompts):
    r = ds.records[held[j % len(held)]]
    key, bpm = KEYS[j % len(KEYS)], TEMPI[j % len(TEMPI)]
    prompts.append(_restyle(r["caption"], key, bpm))
    tonic, mode = key.split()
    truth.append((M.pitch_class(tonic), mode, bpm))
  lat = gen(prompts, int(args.seconds * fr))
  keys, tempi = [], []
  for j, z in enumerate(lat):
    a = codec.decode(z)[0]
    save_audio(os.path.join(out_dir, f"prompt_{j:02d}.wav"), a[None], sr)
    keys.append(M.estimate_key(a, sr))
    tempi.append(M.estimate_tempo(a, sr))
  rel = [M.key_relation(k, t[:2]) for k, t in zip(keys, truth)]
  chance = [M.key_relation(k, truth[(j + s) % len(truth)][:2])
            for j, k in enumerate(keys) for s in range(1, len(truth))]
  terr = [M.tempo_error(e, t[2]) for e, t in zip(tempi, truth)]
  tchance = [M.tempo_error(e, truth[(j + s) % len(truth)][2])
             for j, e in enumerate(tempi) for s in range(1, len(truth))]
  res["prompt"] = dict(
      n=len(prompts), seconds=args.seconds,
      key_exact=float(np.mean([x == "exact" for x in rel])),
      key_exact_or_related=float(np.mean([x != "other" for x in rel])),
      key_exact_chance=float(np.mean([x == "exact" for x in chance])),
      key_exact_or_related_chance=float(np.mean([x != "other" for x in chance])),
      tempo_within_8pct=float(np.mean([e < np.log2(1.08) for e in terr])),
      tempo_within_8pct_chance=float(np.mean([e < np.log2(1.08) for e in tchance])),
      tempo_median_err_log2=float(np.median(terr)),
      items=[dict(prompt=p, key=f"{M.NAMES[k[0]]} {k[1]}", bpm=e, key_relation=x)
             for p, k, e, x in zip(prompts, keys, tempi, rel)])
  log(f"[eval] {label}: prompts done ({time.perf_counter() - t0:.0f} s)")

  # 2. loudness over a long stream
  lat = gen(prompts[: args.long_streams], int(args.long_seconds * fr))
  stab = []
  for j, z in enumerate(lat):
    a = codec.decode(z)[0]
    save_audio(os.path.join(out_dir, f"long_{j:02d}.wav"), a[None], sr)
    stab.append(M.loudness_stability(a, sr))
  res["loudness"] = {k: float(np.mean([s[k] for s in stab])) for k in stab[0]}
  res["loudness"].update(n=len(stab), seconds=args.long_seconds)
  log(f"[eval] {label}: long streams done ({time.perf_counter() - t0:.0f} s)")

  accomp, sketch = extra_groups(cfg)
  E, C = cfg.extra_dim, cfg.io_channels
  frames = int(args.cond_seconds * fr)
  n_items = [i for i in held if ds.melody is not None and ds.records[i]["key"] in ds.melody]
  # 3. sketch adherence (same prompt and seed, with and without the sketch)
  if sketch and n_items:
    caps, ex, mel = [], [], []
    for j in range(args.prompts):
      i = n_items[j % len(n_items)]
      r = ds.records[i]
      start = (j // len(n_items)) * frames
      m = ds.melody[r["key"]][start:start + frames]
      m = np.pad(m, (0, frames - len(m)), constant_values=np.nan)
      e = np.zeros((frames, E), np.float32)
      e[:, E - SKETCH_DIM:] = pitch_features(m)
      caps.append(r["caption"])
      ex.append(e)
      mel.append(m)
    ex = np.stack(ex)
    with_s = gen(caps, frames, ex)
    without = gen(caps, frames, np.zeros_like(ex))
    rows = {"with": [], "without": []}
    for j in range(len(caps)):
      for name, z in (("with", with_s[j]), ("without", without[j])):
        a = codec.decode(z)[0]
        if j < 4:
          save_audio(os.path.join(out_dir, f"sketch_{name}_{j:02d}.wav"), a[None], sr)
        rows[name].append(M.sketch_adherence(a, sr, codec.hop, mel[j]))
    res["sketch"] = {name: dict(share=float(np.mean([x["share"] for x in v])),
                                top1=float(np.mean([x["top1"] for x in v])))
                     for name, v in rows.items()}
    res["sketch"]["n"] = len(caps)
    log(f"[eval] {label}: sketch done ({time.perf_counter() - t0:.0f} s)")
  # 4. jamming: a held-out stem as the partner
  duo = [i for i in held if len(ds.records[i]["stems"]) >= 2]
  if accomp and duo:
    caps, ex, partners = [], [], []
    for j in range(args.prompts):
      i = duo[j % len(duo)]
      r = ds.records[i]
      st = ds.stem_latents(i)
      start = (j // len(duo)) * frames
      p = st[1][start:start + frames].astype(np.float32)
      e = np.zeros((frames, E), np.float32)
      e[:len(p), 0] = 1.0
      e[:len(p), 1:1 + C] = p
      name = r["stems"][0].get("name", "solo")
      caps.append(f"{name[:1].upper()}{name[1:]} part. {r['caption']}")
      ex.append(e)
      partners.append(codec.decode(np.pad(p, ((0, frames - len(p)), (0, 0))))[0])
    ex = np.stack(ex)
    with_p = gen(caps, frames, ex)
    no_acc = ex.copy()
    no_acc[:, :, :1 + C] = 0
    without = gen(caps, frames, no_acc)
    agree = {"with": [], "without": []}
    for j in range(len(caps)):
      for name, z in (("with", with_p[j]), ("without", without[j])):
        a = codec.decode(z)[0]
        if j < 4:
          save_audio(os.path.join(out_dir, f"jam_{name}_{j:02d}.wav"),
                     np.stack([a, partners[j][:len(a)]]), sr)
        agree[name].append(M.chroma_agreement(a, partners[j], sr))
    res["jam"] = {k: float(np.nanmean(v)) for k, v in agree.items()}
    res["jam"]["n"] = len(caps)
    log(f"[eval] {label}: jam done ({time.perf_counter() - t0:.0f} s)")
  return res


def real_reference(args, held, ds):
  """The estimators on the real held-out recordings against their metadata (upper bound)."""
  out = []
  for i in held:
    r = ds.records[i]
    info = r.get("info", {})
    a = _real_audio(args.audio, r["source"], args.seconds, 22050)
    k = M.estimate_key(a, 22050)
    t = M.estimate_tempo(a, 22050)
    truth = (M.pitch_class(info["tonic"]), info["mode"])
    out.append(dict(key_relation=M.key_relation(k, truth),
                    tempo_err=M.tempo_error(t, info["tempo_bpm"]),
                    loud=M.loudness_stability(_real_audio(args.audio, r["source"],
                                                          args.long_seconds, 22050), 22050)))
  return dict(n=len(out), key_exact=float(np.mean([o["key_relation"] == "exact" for o in out])),
              key_exact_or_related=float(np.mean([o["key_relation"] != "other" for o in out])),
              tempo_within_8pct=float(np.mean([o["tempo_err"] < np.log2(1.08) for o in out])),
              loudness_std_db=float(np.mean([o["loud"]["std_db"] for o in out])))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--checkpoint", action="append", required=True,
                  help="[label=]path of a bundle .npz or train.py work directory (repeatable)")
  ap.add_argument("--data", default="data_cache/latents_spectral")
  ap.add_argument("--audio", default="data_cache/corpus/audio")
  ap.add_argument("--out", default="runs/music_eval")
  ap.add_argument("--prompts", type=int, default=12)
  ap.add_argument("--seconds", type=float, default=30.0)
  ap.add_argument("--long-seconds", type=float, default=120.0)
  ap.add_argument("--long-streams", type=int, default=4)
  ap.add_argument("--cond-seconds", type=float, default=20.0)
  ap.add_argument("--steps", type=int)
  ap.add_argument("--cfg-scale", type=float)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  from lmdm_jax.data.dataset import LatentDataset
  ds = LatentDataset(args.data, 16)
  _, held = ds.split()
  os.makedirs(args.out, exist_ok=True)
  results = {"real": real_reference(args, held, ds)}
  for spec in args.checkpoint:
    label, system = _load(spec, print)
    results[label] = evaluate(label, system, args, held, ds)
  with open(os.path.join(args.out, "music_eval.json"), "w") as f:
    json.dump(results, f, indent=1)
  labels = [k for k in results if k != "real"]
  real = results["real"]
  print(f"\nheld-out pieces: {real['n']}; prompts: {args.prompts} x {args.seconds:g} s, "
        f"long streams: {args.long_streams} x {args.long_seconds:g} s")
  print(f"{'model':<12} {'key exact':>9} {'(chance)':>8} {'key ±rel':>8} {'(chance)':>8} "
        f"{'tempo±8%':>8} {'(chance)':>8} {'loud std':>8} {'slope/min':>9} {'silent':>6}")
  print(f"{'real audio':<12} {real['key_exact']:>9.2f} {'':>8} {real['key_exact_or_related']:>8.2f} "
        f"{'':>8} {real['tempo_within_8pct']:>8.2f} {'':>8} {real['loudness_std_db']:>8.2f}")
  for k in labels:
    p, lo = results[k]["prompt"], results[k]["loudness"]
    print(f"{k:<12} {p['key_exact']:>9.2f} {p['key_exact_chance']:>8.2f} "
          f"{p['key_exact_or_related']:>8.2f} {p['key_exact_or_related_chance']:>8.2f} "
          f"{p['tempo_within_8pct']:>8.2f} {p['tempo_within_8pct_chance']:>8.2f} "
          f"{lo['std_db']:>8.2f} {lo['slope_db_per_min']:>9.2f} {lo['silent_windows']:>6.2f}")
  print(f"\n{'model':<12} {'sketch share':>12} {'(no sketch)':>11} {'top-1':>6} {'(no sk.)':>8} "
        f"{'jam chroma r':>12} {'(no partner)':>12}")
  for k in labels:
    s, j = results[k].get("sketch"), results[k].get("jam")
    sk = (f"{s['with']['share']:>12.3f} {s['without']['share']:>11.3f} {s['with']['top1']:>6.3f} "
          f"{s['without']['top1']:>8.3f}") if s else f"{'-':>12} {'-':>11} {'-':>6} {'-':>8}"
    jm = f"{j['with']:>12.3f} {j['without']:>12.3f}" if j else f"{'-':>12} {'-':>12}"
    print(f"{k:<12} {sk} {jm}")
  print(f"\nwrote {os.path.join(args.out, 'music_eval.json')} and WAVs under {args.out}/")


if __name__ == "__main__":
  main()
