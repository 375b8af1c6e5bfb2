"""Re-create the default codec's assets (``lmdm_jax/codecs/assets/spectral_default.npz``).

Three stages:

  python scripts/fit_default_codec.py render       # music21 scores -> MIDI -> FluidSynth -> WAV
  python scripts/fit_default_codec.py export-flac  # train WAVs -> 16-bit FLAC (the fit's input)
  python scripts/fit_default_codec.py fit          # FLAC -> PCA basis + small nets -> assets
  python scripts/fit_default_codec.py refit-decoder --extra data_cache/corpus/audio
                                                   # a larger decoder for the SAME latents

``render`` needs ``apt-get install fluidsynth fluid-soundfont-gm`` and ``pip install music21
mido``; it writes 22.05 kHz mono clips (<= 75 s per piece) into
``data_cache/codec_data/{train,heldout}/`` (git-ignored). Pieces, not clips, are held out.
``export-flac`` makes the compact copy (about 57 MB) that can be carried to an accelerator.
``fit`` needs numpy, soundfile, jax and optax. It is deterministic for a given machine and
jax version (fixed seeds and data order; float64 PCA with sign-fixed components); the shipped
asset is ``fit`` then ``refit-decoder``, both with the defaults and ``--data data_cache/codec_flac``,
on one NVIDIA H200 (jax 0.11.2; about 1 min of training each; 192 latent dims, because a linear
reconstruction from 128 principal components caps held-out chroma near 0.91 and every decoder
tried on 128 latents stopped at 0.945 < 0.95).
A CPU rerun (estimated about an hour on 2 cores; not done) gives the same PCA and a network of
the same recipe, but not bit-identical weights, since GPU and CPU float rounding differ. The
asset records its recipe in its ``recipe`` field.

``refit-decoder`` keeps an asset's encoder (PCA basis, encoder net, latent statistics) bit for
bit and trains only a new decoder net (deeper, residual, optionally on more audio), so latents
already encoded and models already trained on them stay valid. Held-out pieces (the ``heldout``
split's names) are excluded from the extra audio.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DATA_DIR = os.path.join(ROOT, "data_cache", "codec_data")
SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
SR = 22050
CLIP_SECONDS = 75.0

# (corpus path, style) -- style picks the instrument palette and whether a drum kit plays along.
TRAIN_PIECES = [
    ("bach/bwv1.6", "chorale"), ("bach/bwv10.7", "chorale"), ("bach/bwv101.7", "chorale"),
    ("bach/bwv104.6", "chorale"), ("bach/bwv110.7", "chorale"), ("bach/bwv113.8", "chorale"),
    ("bach/bwv12.7", "chorale"), ("bach/bwv140.7", "chorale"),
    ("mozart/k155/movement1.mxl", "quartet"), ("mozart/k156/movement3.mxl", "quartet"),
    ("mozart/k458/movement2.mxl", "quartet"), ("mozart/k80/movement1.mxl", "quartet"),
    ("mozart/k545/movement1_exposition.mxl", "keys"),
    ("haydn/opus1no1/movement1.mxl", "quartet"), ("haydn/opus74no1/movement2.mxl", "quartet"),
    ("haydn/opus1no1/movement4.mxl", "band"),
    ("beethoven/opus18no1/movement1.mxl", "quartet"), ("beethoven/opus59no1/movement2.mxl", "band"),
    ("beethoven/opus59no2/movement3.mxl", "quartet"),
    ("monteverdi/madrigal.3.1.mxl", "choir"), ("monteverdi/madrigal.4.3.mxl", "winds"),
    ("monteverdi/madrigal.5.2.mxl", "choir"),
    ("palestrina/Agnus_01.krn", "choir"), ("palestrina/Kyrie_00.krn", "winds"),
    ("chopin/mazurka06-2.krn", "keys"), ("handel/rinaldo/Lascia_chio_pianga.mxl", "keys"),
    ("corelli/opus3no1/1grave.xml", "quartet"), ("verdi/laDonnaEMobile.mxl", "band"),
    ("ryansMammoth/AcaciaReel.abc", "folk"), ("ryansMammoth/AcrobatsHornpipe.abc", "folk"),
    ("ryansMammoth/7thRegimentReel.abc", "folk"),
    ("essenFolksong/altdeu10.abc", "folk"), ("essenFolksong/ballad20.abc", "folk"),
    # More keyboard / mallet timbres (piano, e-piano, harpsichord, vibraphone, guitar).
    ("bach/bwv145.5", "keys"), ("bach/bwv146.8", "keys"), ("bach/bwv148.6", "keys"),
    ("bach/bwv149.7", "keys"), ("bach/bwv151.5", "winds"), ("bach/bwv153.1", "band"),
    ("mozart/k156/movement1.mxl", "keys"), ("haydn/opus1no1/movement2.mxl", "keys"),
    ("essenFolksong/kinder0.abc", "keys"), ("essenFolksong/han1.abc", "keys"),
]
HELDOUT_PIECES = [
    ("bach/bwv66.6", "chorale"), ("joplin/maple_leaf_rag.mxl", "keys"),
    ("mozart/k458/movement3.mxl", "quartet"), ("haydn/opus74no1/movement1.mxl", "band"),
    ("beethoven/opus18no1/movement3.mxl", "quartet"), ("schubert/Lindenbaum.xml", "keys"),
    ("monteverdi/madrigal.3.2.mxl", "choir"), ("ryansMammoth/AdmiralsHornpipe.abc", "folk"),
    ("essenFolksong/erk10.abc", "band"),
]

# General MIDI programs per style (a part draws one, seeded by the piece name).
PALETTES = {
    "chorale": [19, 52, 48, 0, 20, 49, 68, 70],  # organs, choir, strings, piano, oboe, bassoon
    "quartet": [40, 41, 42, 43, 48, 0, 46],  # violin viola cello contrabass strings piano harp
    "keys": [0, 1, 4, 6, 2, 24, 11],  # pianos, e-pianos, harpsichord, nylon guitar, vibraphone
    "choir": [52, 53, 54, 48, 89, 19],  # choir aahs/oohs, synth voice, strings, pad, organ
    "winds": [73, 71, 68, 70, 60, 56, 57, 61],  # flute clarinet oboe bassoon horn trumpet trombone
    "band": [56, 61, 65, 33, 0, 25, 29, 81],  # trumpet, brass, sax, bass, piano, guitars, lead
    "folk": [40, 73, 22, 21, 105, 24, 110, 74],  # fiddle flute harmonica accordion banjo guitar
}
DRUM_STYLES = {"band", "folk"}


def _truncate_midi(mid, seconds: float):
  """One merged track cut at ``seconds`` (tempo-aware), with all-notes-off at the cut."""
  import mido

  out = mido.MidiFile(type=0, ticks_per_beat=mid.ticks_per_beat)
  track = mido.MidiTrack()
  tempo, t = 500000, 0.0
  for msg in mido.merge_tracks(mid.tracks):
    t += mido.tick2second(msg.time, mid.ticks_per_beat, tempo)
    if t > seconds:
      break
    if msg.type == "set_tempo":
      tempo = msg.tempo
    track.append(msg)
  for ch in range(16):
    track.append(mido.Message("control_change", channel=ch, control=123, value=0, time=0))
  track.append(mido.MetaMessage("end_of_track", time=mid.ticks_per_beat))
  out.tracks.append(track)
  return out


def _render_piece(path: str, style: str, out_wav: str) -> bool:
  import mido
  import music21

  score = music21.corpus.parse(path)
  if isinstance(score, music21.stream.Opus):
    score = score.scores[0]
  rng = np.random.default_rng(zlib.crc32(path.encode()))
  palette = PALETTES[style]
  parts = list(score.parts) if score.parts else [score]
  for part in parts:
    for inst in list(part.recurse().getElementsByClass(music21.instrument.Instrument)):
      part.remove(inst, recurse=True)
    inst = music21.instrument.Instrument()
    inst.midiProgram = int(palette[rng.integers(len(palette))])
    part.insert(0, inst)
  with tempfile.TemporaryDirectory() as tmp:
    mid_path = os.path.join(tmp, "in.mid")
    score.write("midi", fp=mid_path)
    mid = mido.MidiFile(mid_path)
    # Tempo variety: scale every tempo by a seeded factor.
    factor = float(rng.uniform(0.8, 1.25))
    for track in mid.tracks:
      for msg in track:
        if msg.type == "set_tempo":
          msg.tempo = int(msg.tempo / factor)
    if style in DRUM_STYLES:
      tpb = mid.ticks_per_beat
      total = int(max(sum(m.time for m in t) for t in mid.tracks))
      drums = mido.MidiTrack()
      events = []
      eighth = tpb // 2
      for k, tick in enumerate(range(0, total, eighth)):
        events.append((tick, 42, 60 + int(rng.integers(20))))  # closed hi-hat
        if k % 4 == 0:
          events.append((tick, 36, 100))  # kick on beats 1, 3
        if k % 4 == 2:
          events.append((tick, 38, 90))  # snare on 2, 4
      last = 0
      for tick, note, vel in events:
        drums.append(mido.Message("note_on", channel=9, note=note, velocity=vel, time=tick - last))
        drums.append(mido.Message("note_off", channel=9, note=note, velocity=0, time=0))
        last = tick
      mid.tracks.append(drums)
    mid = _truncate_midi(mid, CLIP_SECONDS + 3.0)
    mid.save(mid_path)
    raw = os.path.join(tmp, "out.wav")
    subprocess.run(["fluidsynth", "-ni", "-g", "0.6", "-F", raw, "-r", str(SR), SOUNDFONT,
                    mid_path], check=True, capture_output=True, timeout=120)
    import soundfile as sf

    audio, sr = sf.read(raw, dtype="float32", always_2d=True)
  assert sr == SR, sr
  audio = audio.mean(axis=1)
  nz = np.nonzero(np.abs(audio) > 1e-4)[0]
  if len(nz) == 0:
    return False
  audio = audio[nz[0]:nz[-1] + 1][: int(CLIP_SECONDS * SR)]
  peak = np.abs(audio).max()
  # Loudness variety: peak-normalize to a seeded level between -12 and -1 dBFS.
  audio = audio / peak * 10 ** (rng.uniform(-12, -1) / 20)
  sf.write(out_wav, audio.astype(np.float32), SR, subtype="FLOAT")
  return True


def render(args) -> None:
  for split, pieces in (("train", TRAIN_PIECES), ("heldout", HELDOUT_PIECES)):
    os.makedirs(os.path.join(DATA_DIR, split), exist_ok=True)
    for path, style in pieces:
      name = re.sub(r"\.(mxl|xml|krn|abc)$", "", path).replace("/", "_").replace(".", "_")
      out = os.path.join(DATA_DIR, split, name + ".wav")
      if os.path.exists(out) and not args.force:
        continue
      try:
        ok = _render_piece(path, style, out)
        print(f"{split:8s} {path:50s} {'ok' if ok else 'silent'}", flush=True)
      except Exception as e:  # noqa: BLE001 -- a broken score should not stop the batch
        print(f"{split:8s} {path:50s} FAILED {type(e).__name__}: {e}", flush=True)


def list_wavs(split_or_dir: str) -> list[str]:
  d = split_or_dir if os.path.isdir(split_or_dir) else os.path.join(DATA_DIR, split_or_dir)
  return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith((".wav", ".flac")))


def load_wav(path: str) -> np.ndarray:
  import soundfile as sf

  audio, sr = sf.read(path, dtype="float32", always_2d=True)
  if sr != SR:
    raise ValueError(f"{path}: {sr} Hz, expected {SR}")
  return audio.mean(axis=1)


def fit_pca(wavs: list[str], latent_dim: int, eps: float):
  """Mean log-spectrum, top principal directions (sign-fixed), and their standard deviations."""
  from lmdm_jax.codecs.spectral import log_magnitude

  n_bins = None
  total, s1, s2 = 0, None, None
  for path in wavs:
    x = log_magnitude(load_wav(path), eps).astype(np.float64)
    if s1 is None:
      n_bins = x.shape[1]
      s1, s2 = np.zeros(n_bins), np.zeros((n_bins, n_bins))
    total += x.shape[0]
    s1 += x.sum(0)
    s2 += x.T @ x
  mean = s1 / total
  cov = s2 / total - np.outer(mean, mean)
  evals, evecs = np.linalg.eigh(cov)
  order = np.argsort(evals)[::-1][:latent_dim]
  evals, basis = evals[order], evecs[:, order]
  # Deterministic signs: the largest-magnitude entry of every component is positive.
  signs = np.sign(basis[np.abs(basis).argmax(0), np.arange(latent_dim)])
  basis = basis * signs
  explained = evals.sum() / np.trace(cov)
  return mean, basis, np.sqrt(evals), explained, total


def _conv_valid(h, w, b):
  """'valid' temporal conv: h (N, T, Cin), w (k, Cin, Cout) -> (N, T-k+1, Cout)."""
  k = w.shape[0]
  t = h.shape[1] - k + 1
  return sum(h[:, j:j + t] @ w[j] for j in range(k)) + b


def _adam_step(loss_fn, params, steps: int, lr: float):
  """The codec nets' optimizer: Adam, one-cycle cosine schedule, global-norm clip 1.0.

  ``loss_fn(params, *batch) -> (loss, aux)``. Returns the jitted ``step(params, state, *batch)
  -> (params, state, aux)`` and the initial optimizer state.
  """
  import jax
  import optax

  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adam(optax.cosine_onecycle_schedule(steps, lr, pct_start=0.05)))

  @jax.jit
  def step(p, s, *batch):
    (_, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p, *batch)
    upd, s = opt.update(g, s, p)
    return optax.apply_updates(p, upd), s, aux

  return step, opt.init(params)


def train_net(wavs, mean, basis, scale, *, latent_dim: int, enc_layers: int, dec_layers: int,
              hidden: int, steps: int, batch: int = 48, seed: int = 0, noise: float = 0.1,
              penalty: float = 0.1, lr: float = 1e-3, eps: float = 1e-4, hi_weight: float = 0.0,
              hi_eps: float = 1e-3, log_every: int = 500):
  """Train the codec's small networks with optax (deterministic: fixed seed and data order).

  Latent: z = (first ``latent_dim`` whitened PCA coordinates) + encoder residual. The encoder
  (``enc_layers`` temporal convs, kernel 3, GELU, then a zero-initialised linear layer) reads all
  ``basis.shape[1]`` whitened PCA coordinates; an L2 penalty on its residual keeps the latents
  near the PCA ones (smooth, well conditioned). ``enc_layers=0``: pure PCA latents.
  Decoder: log-magnitude = PCA reconstruction of z + residual of ``dec_layers`` temporal convs
  (kernel 3, GELU) and a zero-initialised linear layer. Gaussian latent noise of ``noise`` std
  is added in training so the decoder tolerates the generator's latent error budget.
  Loss: mean squared error of the log-magnitude (natural log), i.e. the log-spectral distance,
  plus ``hi_weight`` times the same with a high floor ``hi_eps`` (-60 dBFS), which weighs the
  loud partials that carry pitch (chroma).
  """
  import jax
  import jax.numpy as jnp

  from lmdm_jax.codecs.spectral import log_magnitude

  feats = [log_magnitude(load_wav(p), eps) for p in wavs]
  n_bins, n_pca = basis.shape
  crop = 32
  enc_r, dec_r = enc_layers, dec_layers
  win = crop + 2 * dec_r + 2 * enc_r
  rng = np.random.default_rng(seed)
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 16))

  def glorot(shape, fan_in):
    return jax.random.normal(next(keys), shape, jnp.float32) / np.sqrt(fan_in)

  params = {}
  c_in = latent_dim
  for i in range(dec_layers):
    params[f"conv{i}_w"] = glorot((3, c_in, hidden), 3 * c_in)
    params[f"conv{i}_b"] = jnp.zeros(hidden)
    c_in = hidden
  params["out_w"] = jnp.zeros((hidden, n_bins))
  params["out_b"] = jnp.zeros(n_bins)
  c_in = n_pca
  for i in range(enc_layers):
    params[f"enc{i}_w"] = glorot((3, c_in, hidden), 3 * c_in)
    params[f"enc{i}_b"] = jnp.zeros(hidden)
    c_in = hidden
  if enc_layers:
    params["enc_out_w"] = jnp.zeros((hidden, latent_dim))
  mean_j, basis_j, scale_j = jnp.asarray(mean), jnp.asarray(basis), jnp.asarray(scale)

  def encode(p, x):  # (N, T, F) -> (N, T - 2 enc_r, K), penalty
    pc = ((x - mean_j) @ basis_j) / scale_j
    z = pc[:, enc_r:pc.shape[1] - enc_r, :latent_dim]
    if not enc_layers:
      return z, 0.0
    h = pc
    for i in range(enc_layers):
      h = jax.nn.gelu(_conv_valid(h, p[f"enc{i}_w"], p[f"enc{i}_b"]))
    res = h @ p["enc_out_w"]
    return z + res, jnp.mean(res ** 2)

  def decode(p, z):  # (N, T, K) -> (N, T - 2 dec_r, F)
    base = (z * scale_j[:latent_dim]) @ basis_j[:, :latent_dim].T + mean_j
    h = z
    for i in range(dec_layers):
      h = jax.nn.gelu(_conv_valid(h, p[f"conv{i}_w"], p[f"conv{i}_b"]))
    return base[:, dec_r:base.shape[1] - dec_r] + h @ p["out_w"] + p["out_b"]

  def loss_fn(p, x, nz):
    z, pen = encode(p, x)
    y = decode(p, z + noise * nz)
    tgt = x[:, enc_r + dec_r:x.shape[1] - enc_r - dec_r]
    rec = jnp.mean((y - tgt) ** 2)
    loss = rec + penalty * pen
    if hi_weight:  # the same error seen with a high floor: weighs the loud partials (chroma)
      hi = lambda v: jnp.log(jnp.maximum(jnp.exp(v) - eps, 0.0) + hi_eps)
      loss = loss + hi_weight * jnp.mean((hi(y) - hi(tgt)) ** 2)
    return loss, rec

  step, state = _adam_step(loss_fn, params, steps, lr)

  lengths = np.array([f.shape[0] - win for f in feats])
  probs = lengths / lengths.sum()
  run = 0.0
  t_start = time.time()
  for i in range(steps):
    piece = rng.choice(len(feats), size=batch, p=probs)
    x = np.stack([feats[j][o:o + win] for j, o in
                  zip(piece, (rng.random(batch) * lengths[piece]).astype(int))])
    nz = rng.standard_normal((batch, win - 2 * enc_r, latent_dim)).astype(np.float32)
    params, state, rec = step(params, state, jnp.asarray(x), jnp.asarray(nz))
    run = 0.98 * run + 0.02 * float(rec) if i else float(rec)
    if i % log_every == 0 or i == steps - 1:
      print(f"step {i:6d}  recon mse {run:.4f} (nat-log^2, with latent noise)"
            f"  {time.time() - t_start:.0f} s", flush=True)
  out = {k: np.asarray(v, np.float32) for k, v in params.items()}
  # Per-channel latent statistics on the training audio: the codec standardizes with them.
  zs = []
  enc_j = jax.jit(encode)
  for f in feats:
    pad = np.full((enc_r, n_bins), np.log(eps), np.float32)
    zs.append(np.asarray(enc_j(params, jnp.asarray(np.concatenate([pad, f, pad])[None]))[0][0]))
  zs = np.concatenate(zs)
  out["latent_mean"], out["latent_std"] = zs.mean(0), zs.std(0)
  return out


def _decoder_data(paths, codec, eps):
  """Encode every file (22.05 kHz mono) with ``codec``: lists of (latents, target log-mags)."""
  from lmdm_jax.codecs.spectral import HOP, log_magnitude
  from lmdm_jax.data.audio import AudioFileError, load_audio

  zs, ts, skipped = [], [], 0
  for i, path in enumerate(paths):
    try:
      y = load_audio(path, SR, 1)[0]
    except AudioFileError as e:  # silent / unreadable: counted, not fatal
      print(f"  skipped {path}: {e}", flush=True)
      skipped += 1
      continue
    y = y[: len(y) // HOP * HOP]
    zs.append(codec.encode(y[None]).astype(np.float16))
    ts.append(log_magnitude(y, eps).astype(np.float16))
    if (i + 1) % 20 == 0:
      print(f"  encoded {i + 1}/{len(paths)} files", flush=True)
  return zs, ts, skipped


def train_decoder(codec, zs, ts, *, layers: int, hidden: int, kernel: int, residual: bool,
                  steps: int, batch: int, crop: int, lr: float, noise: float, hi_weight: float,
                  chroma_weight: float = 0.0, init=None, hi_eps: float = 1e-3, seed: int = 0,
                  eval_set=None, log_every: int = 250):
  """Train a decoder net for ``codec``'s fixed latents (deterministic: seeded data order).

  log-magnitude = the asset's PCA reconstruction + ``layers`` 'valid' temporal convs (odd
  ``kernel``, GELU, a skip connection on square layers when ``residual``) + a zero-initialised
  linear layer. Inputs get Gaussian noise of ``noise`` per-channel std (standardized units:
  the generator's error budget). Loss as in ``train_net`` (log-spectral MSE + ``hi_weight`` x the
  same with a -60 dBFS floor) + ``chroma_weight`` x the MSE of per-frame max-normalised chroma
  (librosa's STFT chroma filter bank on the power spectrum: what the chroma target measures).
  ``init``: asset arrays (``net_conv*``, ``net_out_*``) to start from (a second, fine-tuning
  stage). Returns the asset arrays ``net_conv*``, ``net_out_*``.
  """
  import jax
  import jax.numpy as jnp

  k, eps = codec.latent_dim, codec.eps
  lat_std, lat_mean = jnp.asarray(codec.lat_std), jnp.asarray(codec.lat_mean)
  basis_t = jnp.asarray(codec.basis[:, :k].T)
  scale, mean = jnp.asarray(codec.scale[:k]), jnp.asarray(codec.mean)
  n_bins = basis_t.shape[1]
  rad = (kernel - 1) // 2 * layers
  keys = jax.random.split(jax.random.PRNGKey(seed), layers)
  convs, c_in = [], k
  for i in range(layers):
    convs.append((jax.random.normal(keys[i], (kernel, c_in, hidden)) / np.sqrt(kernel * c_in),
                  jnp.zeros(hidden)))
    c_in = hidden
  params = {"convs": convs, "out_w": jnp.zeros((hidden, n_bins)), "out_b": jnp.zeros(n_bins)}
  if init is not None:
    want = {f"net_conv{i}_{x}": v.shape for i, c in enumerate(convs) for x, v in zip("wb", c)}
    want.update(net_out_w=params["out_w"].shape, net_out_b=params["out_b"].shape)
    got = {k: tuple(v.shape) for k, v in init.items()}
    if got != want:
      raise ValueError(f"--init decoder does not match --dec-layers/--hidden/--kernel: it has"
                       f" {got}, expected {want}")
    params = {"convs": [(jnp.asarray(init[f"net_conv{i}_w"], jnp.float32),
                         jnp.asarray(init[f"net_conv{i}_b"], jnp.float32)) for i in range(layers)],
              "out_w": jnp.asarray(init["net_out_w"], jnp.float32),
              "out_b": jnp.asarray(init["net_out_b"], jnp.float32)}

  def decode(p, z):  # standardized (N, T + 2 rad, K) -> (N, T, F); the codec's _decode_logmag
    lat = z * lat_std + lat_mean
    base = (lat * scale) @ basis_t + mean
    h = lat
    for w, b in p["convs"]:
      y = jax.nn.gelu(_conv_valid(h, w, b))
      if residual and w.shape[1] == w.shape[2]:
        y = y + h[:, (kernel - 1) // 2:(kernel - 1) // 2 + y.shape[1]]
      h = y
    return base[:, rad:base.shape[1] - rad] + h @ p["out_w"] + p["out_b"]

  hi = lambda v: jnp.log(jnp.maximum(jnp.exp(v) - eps, 0.0) + hi_eps)

  if chroma_weight:  # librosa only for the chroma loss (an accelerator machine may lack it)
    import librosa

    chroma_fb = jnp.asarray(librosa.filters.chroma(sr=SR, n_fft=2 * (n_bins - 1),
                                                   tuning=0.0).T)

  def chroma(v):  # log-magnitude (N, T, F) -> max-normalised chroma (N, T, 12)
    c = ((jnp.maximum(jnp.exp(v) - eps, 0.0) * (n_bins - 1) / 2) ** 2) @ chroma_fb
    return c / (jnp.max(c, axis=-1, keepdims=True) + 1e-10)

  def loss_fn(p, z, t):
    y = decode(p, z)
    rec = jnp.mean((y - t) ** 2)
    loss = rec + hi_weight * jnp.mean((hi(y) - hi(t)) ** 2)
    if chroma_weight:
      loss = loss + chroma_weight * jnp.mean((chroma(y) - chroma(t)) ** 2)
    return loss, rec

  step, state = _adam_step(loss_fn, params, steps, lr)

  dec1 = jax.jit(lambda p, z: decode(p, z[None])[0])

  def held_rmse(p):  # log-magnitude RMSE (nat) on the evaluation clips, silence-padded edges
    err = []
    for z, t in eval_set:
      pad = np.repeat(codec.silence[None], rad, 0)
      y = np.asarray(dec1(p, jnp.asarray(np.concatenate([pad, z, pad]))))
      err.append(np.mean((y - t) ** 2))
    return float(np.sqrt(np.mean(err)))

  rng = np.random.default_rng(seed)
  win = crop + 2 * rad
  lengths = np.array([max(len(z) - win, 0) for z in zs])
  probs = lengths / lengths.sum()
  run, t0 = None, time.time()
  for i in range(steps):
    idx = rng.choice(len(zs), batch, p=probs)
    off = (rng.random(batch) * lengths[idx]).astype(int)
    z = np.stack([zs[j][o:o + win] for j, o in zip(idx, off)]).astype(np.float32)
    z += noise * rng.standard_normal(z.shape).astype(np.float32)
    t = np.stack([ts[j][o + rad:o + rad + crop] for j, o in zip(idx, off)]).astype(np.float32)
    params, state, rec = step(params, state, jnp.asarray(z), jnp.asarray(t))
    run = float(rec) if run is None else 0.98 * run + 0.02 * float(rec)
    if (i + 1) % log_every == 0 or i == steps - 1:
      held = f"  held-out log-mag RMSE {held_rmse(params):.4f}" if eval_set else ""
      print(f"step {i + 1:6d}  recon mse {run:.4f} (with latent noise){held}"
            f"  {time.time() - t0:.0f} s", flush=True)
  out = {}
  for i, (w, b) in enumerate(params["convs"]):
    out[f"net_conv{i}_w"], out[f"net_conv{i}_b"] = np.asarray(w), np.asarray(b)
  out["net_out_w"], out["net_out_b"] = np.asarray(params["out_w"]), np.asarray(params["out_b"])
  return out


def refit_decoder(args) -> None:
  from lmdm_jax.codecs.spectral import SpectralCodec, log_magnitude

  src = args.asset
  codec = SpectralCodec(src)
  held_paths = list_wavs(args.heldout) if os.path.isdir(args.heldout) else []
  held = {os.path.splitext(os.path.basename(p))[0] for p in held_paths}
  paths = list_wavs(args.data)
  for d in args.extra:
    extra = sorted(os.path.join(d, f) for f in os.listdir(d)
                   if f.endswith((".wav", ".flac", ".ogg", ".mp3")))
    kept = [p for p in extra if os.path.splitext(os.path.basename(p))[0] not in held]
    print(f"{d}: {len(kept)} files ({len(extra) - len(kept)} held-out pieces excluded)")
    paths += kept
  t0 = time.time()
  zs, ts, skipped = _decoder_data(paths, codec, codec.eps)
  print(f"encoded {len(zs)} files ({skipped} skipped), {sum(len(z) for z in zs)} frames,"
        f" {time.time() - t0:.0f} s", flush=True)
  eval_set = []
  for path in held_paths:  # the bench's clips: 20 s from 10 s in
    y = load_wav(path)
    y = y[int(10 * SR):int(30 * SR)] if len(y) >= 30 * SR else y
    y = y[: len(y) // 512 * 512]
    eval_set.append((codec.encode(y[None]), log_magnitude(y, codec.eps)))
  init = None
  if args.init:
    with np.load(args.init) as z:
      init = {k: z[k] for k in z.files if k.startswith(("net_conv", "net_out"))}
  net = train_decoder(codec, zs, ts, layers=args.dec_layers, hidden=args.hidden,
                      kernel=args.kernel, residual=not args.no_residual, steps=args.steps,
                      batch=args.batch, crop=args.crop, lr=args.lr, noise=args.noise,
                      hi_weight=args.hi_weight, chroma_weight=args.chroma_weight, init=init,
                      eval_set=eval_set or None,
                      log_every=args.log_every)
  with np.load(src) as z:
    arrays = {k: z[k] for k in z.files if not k.startswith(("net_conv", "net_out"))}
  arrays.update({k: v.astype(np.float16 if k.endswith("_w") else np.float32)
                 for k, v in net.items()})
  arrays["net_residual"] = np.bool_(not args.no_residual)
  arrays["recipe"] = np.array(str(arrays.get("recipe", "")) + "; then python"
                              " scripts/fit_default_codec.py " + " ".join(sys.argv[1:]))
  tmp = args.out + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, args.out)
  print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")


def fit(args) -> None:
  wavs = list_wavs(args.data)
  if not wavs:
    raise SystemExit(f"no training audio in {DATA_DIR}/train; run the `render` stage first")
  n_pca = max(args.latent_dim, args.pca_dim if args.enc_layers else args.latent_dim)
  mean, basis, scale, explained, frames = fit_pca(wavs, n_pca, args.eps)
  print(f"PCA on {len(wavs)} pieces, {frames} frames: {n_pca} components explain "
        f"{explained:.3f} of the log-spectral variance")
  arrays = dict(mean=mean.astype(np.float32), basis=basis.astype(np.float32),
                scale=scale.astype(np.float32), latent_dim=np.int32(args.latent_dim),
                eps=np.float32(args.eps))
  if args.enc_layers or args.dec_layers:
    net = train_net(wavs, mean.astype(np.float32), basis.astype(np.float32),
                    scale.astype(np.float32), latent_dim=args.latent_dim,
                    enc_layers=args.enc_layers, dec_layers=args.dec_layers, hidden=args.hidden,
                    steps=args.steps, batch=args.batch, penalty=args.penalty, noise=args.noise,
                    eps=args.eps, hi_weight=args.hi_weight)
    # float16 halves the asset; the codec computes in float32.
    arrays.update({"net_" + k: v.astype(np.float16 if v.ndim == 3 or k.endswith("_w")
                                        else np.float32) for k, v in net.items()})
  arrays["recipe"] = np.array("python scripts/fit_default_codec.py " + " ".join(sys.argv[1:]))
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  np.savez(args.out, **arrays)
  print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")


def export_flac(args) -> None:
  import soundfile as sf

  os.makedirs(args.out, exist_ok=True)
  total = 0
  for path in list_wavs("train"):
    audio, sr = sf.read(path, dtype="float32")
    out = os.path.join(args.out, os.path.basename(path)[:-4] + ".flac")
    sf.write(out, audio, sr, subtype="PCM_16", compression_level=1.0)
    total += os.path.getsize(out)
  print(f"wrote {args.out} ({total / 2**20:.1f} MiB)")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  sub = ap.add_subparsers(dest="cmd", required=True)
  r = sub.add_parser("render")
  r.add_argument("--force", action="store_true")
  r.set_defaults(fn=render)
  e = sub.add_parser("export-flac")
  e.add_argument("--out", default=os.path.join(DATA_DIR, "train_flac"))
  e.set_defaults(fn=export_flac)
  f = sub.add_parser("fit")
  f.add_argument("--data", default=os.path.join(DATA_DIR, "train_flac"),
                 help="folder of training audio (.wav/.flac), or a split of data_cache/codec_data")
  f.add_argument("--latent-dim", type=int, default=192)
  f.add_argument("--out", default=os.path.join(ROOT, "lmdm_jax", "codecs", "assets",
                                                 "spectral_default.npz"))
  f.add_argument("--eps", type=float, default=3e-5, help="log floor, re full-scale magnitude")
  f.add_argument("--hi-weight", type=float, default=4.0)
  f.add_argument("--pca-dim", type=int, default=256, help="encoder input (PCA coordinates)")
  f.add_argument("--enc-layers", type=int, default=1)
  f.add_argument("--dec-layers", type=int, default=2)
  f.add_argument("--hidden", type=int, default=256)
  f.add_argument("--steps", type=int, default=4000)
  f.add_argument("--batch", type=int, default=48)
  f.add_argument("--penalty", type=float, default=0.02)
  f.add_argument("--noise", type=float, default=0.1)
  f.set_defaults(fn=fit)
  d = sub.add_parser("refit-decoder", help="train a new decoder net for an asset's latents")
  d.add_argument("--asset", default=os.path.join(ROOT, "lmdm_jax", "codecs", "assets",
                                                 "spectral_default.npz"))
  d.add_argument("--out", default=os.path.join(ROOT, "lmdm_jax", "codecs", "assets",
                                               "spectral_default.npz"))
  d.add_argument("--data", default=os.path.join(DATA_DIR, "train_flac"))
  d.add_argument("--extra", nargs="*", default=[], help="more audio folders (held-out names"
                 " excluded), e.g. data_cache/corpus/audio")
  d.add_argument("--heldout", default=os.path.join(DATA_DIR, "heldout"),
                 help="held-out audio: excluded from --extra, RMSE reported on it")
  d.add_argument("--dec-layers", type=int, default=4)
  d.add_argument("--hidden", type=int, default=512)
  d.add_argument("--kernel", type=int, default=3)
  d.add_argument("--no-residual", action="store_true")
  d.add_argument("--steps", type=int, default=3000)
  d.add_argument("--batch", type=int, default=32)
  d.add_argument("--crop", type=int, default=48)
  d.add_argument("--lr", type=float, default=1e-3)
  d.add_argument("--noise", type=float, default=0.1)
  d.add_argument("--hi-weight", type=float, default=4.0)
  d.add_argument("--chroma-weight", type=float, default=0.0)
  d.add_argument("--init", default=None, help="start from this asset's decoder (fine-tuning)")
  d.add_argument("--log-every", type=int, default=250)
  d.set_defaults(fn=refit_decoder)
  args = ap.parse_args()
  args.fn(args)


if __name__ == "__main__":
  main()
