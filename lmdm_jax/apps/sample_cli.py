"""Text-to-music (and sketch-to-music): stream blocks with the jitted, KV-cached sampler, decode
them as they come and write a WAV that stays valid at every moment. The WAV is written to
OUT.partial.wav (beside OUT) and renamed to OUT only when the run completes: a run stopped by
Ctrl-C or an error keeps what it made there (and says so) and never touches an existing OUT.

With no --checkpoint and no --config: the bundled trained model (lmdm_jax/assets/demo_model.npz).
--config alone builds that config with RANDOM weights (it exercises the pipeline, no music).

  lmdm sample                                         # 30 s of the bundled model
  lmdm sample --prompt "0:solo piano, calm" --prompt "20:string quartet, lively" --seconds 40
  lmdm sample --checkpoint runs/demo --steps 8 --cfg-scale 3 --plus-plus --play
  lmdm sample --sketch melody.wav                     # sketch-to-music (audio or .mid melody)
  lmdm sample --checkpoint converted/ --t5 t5-base/   # a converted stable-audio-tools model

--prompt SECONDS:TEXT changes the prompt at the block containing that second (no recompilation).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

import numpy as np

from lmdm_jax import compile_cache
from lmdm_jax.apps import checks as K
from lmdm_jax.apps import common as C


def build_parser():
  from lmdm_jax import clip_sampling
  from lmdm_jax import sampling as S
  ap = argparse.ArgumentParser(prog="lmdm sample", description=__doc__,
                               formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--checkpoint", default=None, metavar="SOURCE",
                  help="the model: a bundle .npz, a train.py or arc.py work directory, or a "
                       "converted checkpoint (lmdm convert) (default: the bundled trained model)")
  ap.add_argument("--config", default=None,
                  help="a registered config (tiny | demo | live | saos | arc_demo ...[:arg]) "
                       "or your own path/to/config.py[:arg]: without --checkpoint, that config "
                       "with RANDOM weights; with one, overrides the config it records "
                       "(default: none)")
  ap.add_argument("--prompt", action="append", default=None, metavar="[SECONDS:]TEXT",
                  help="repeatable; '20:string quartet' switches at 20 s (default: a string-quartet "
                       "prompt in the style of the training captions)")
  ap.add_argument("--seconds", type=float, default=30.0,
                  help=f"length in seconds, at most {K.MAX_SECONDS:g} (default: 30)")
  ap.add_argument("--steps", type=int, default=None,
                  help=f"denoising steps per block, 1..{S.MAX_STEPS} (default: the model's, 4 for "
                       "the bundled model)")
  ap.add_argument("--cfg-scale", type=float, default=None,
                  help="classifier-free guidance scale; 1 turns CFG off (default: the model's)")
  ap.add_argument("--plus-plus", action="store_true", help="CFG++ update (default: the model's)")
  ap.add_argument("--sampler", choices=["pingpong", "euler"], default=None,
                  help="denoising update (default: the model's, pingpong)")
  ap.add_argument("--regime", default=None, choices=list(S.REGIMES) + [clip_sampling.REGIME],
                  help="streaming regime (default: the model's, block_causal; 'clip' for base "
                       "models that generate whole clips)")
  ap.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
  ap.add_argument("--codec", default=None,
                  help="codec name (default: the model's); 'none' writes latents (.npy)")
  ap.add_argument("--sketch", default=None, metavar="FILE",
                  help="melody sketch (audio or .mid) -> the model's sketch channels (default: none)")
  ap.add_argument("--out", default="outputs/sample.wav",
                  help="WAV path; latents go to the same name with .npy when there is no codec; "
                       "written as OUT.partial.wav and renamed to OUT when complete "
                       "(default: outputs/sample.wav)")
  ap.add_argument("--play", action="store_true",
                  help="also play through the sound card (needs sounddevice; default: off)")
  ap.add_argument("--no-limiter", action="store_true",
                  help="write the decoder's raw output (the WAV writer then hard-clips anything "
                       "beyond full scale); default: a soft limiter above 0.9 whose count of "
                       "limited samples is printed when non-zero")
  ap.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
  ap.add_argument("--quantize", choices=["none", "int8"], default="none",
                  help="int8: run the DiT's block linears as dynamic int8 (int8 weights per output "
                  "channel, activations per token; a CPU speed option, see docs/STREAMING.md); "
                  "default: none (the model's dtype)")
  ap.add_argument("--t5", default=None, metavar="DIR",
                  help="local Hugging Face T5 folder for T5-conditioned models (--config saos, a "
                       "converted checkpoint) (default: the folder recorded by the converter)")
  ap.add_argument("--vae", default=None, metavar="PATH",
                  help="VAE for a converted checkpoint that has none: a converted directory "
                       "holding one, or a VAE .safetensors/.ckpt (default: the checkpoint's own)")
  return ap


def open_player(sample_rate: int, channels: int):
  """A sounddevice output stream, or None with a message saying why not."""
  try:
    import sounddevice as sd
  except Exception as e:  # noqa: BLE001 - ImportError or PortAudio missing (OSError)
    print(f"[sample] --play: sounddevice is not usable here ({type(e).__name__}: {e}); "
          "`pip install sounddevice` (needs PortAudio); writing the file only")
    return None
  try:
    sd.query_devices(kind="output")
    stream = sd.OutputStream(samplerate=sample_rate, channels=channels, dtype="float32")
    stream.start()
    return stream
  except Exception as e:  # noqa: BLE001
    print(f"[sample] --play: no sound output device ({type(e).__name__}: {e}); writing the file only")
    return None


def main(argv=None):
  args = build_parser().parse_args(argv)
  compile_cache.enable(log=lambda m: print(f"[sample] {m}"))
  try:
    return run(args)
  except C.UsageError as e:
    print(f"sample.py: error: {K.one_line(e)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:  # before the stream started: nothing was written
    print("[sample] interrupted before any output was written", file=sys.stderr)
    return 130


class NonFiniteOutput(RuntimeError):
  """The model (or the decoder) produced NaN or infinite values."""


def latents_path(out: str) -> str:
  return os.path.splitext(out)[0] + ".npy"


def check_args(args):
  """Every value that can be checked without a model (UsageError on the first bad one); -> the
  parsed prompts."""
  K.seconds("--seconds", args.seconds)
  K.steps(args.steps)
  if args.cfg_scale is not None:
    K.number("--cfg-scale", args.cfg_scale)
  K.seed(args.seed)
  prompts = C.parse_prompts(args.prompt)
  for p in prompts:
    K.text("--prompt", p.text)
  K.codec(args.codec)
  if args.checkpoint:
    K.input_file("--checkpoint", args.checkpoint)
  if args.sketch:
    from lmdm_jax.data import sketch as sketch_data
    try:
      sketch_data.check_sketch(args.sketch)
    except sketch_data.SketchError as e:
      raise C.UsageError(f"--sketch: {e}") from e
  inputs = {"--sketch": args.sketch, "--checkpoint": args.checkpoint}
  K.output("--out", args.out, inputs)
  K.output("--out (its latents file)", latents_path(args.out), inputs)
  if args.config is not None:
    conf = K.config(args.config)
    K.regime(args.regime or conf.sampler.regime, f"the sampler regime of config {args.config!r}")
  return prompts


def run(args):
  prompts = check_args(args)  # before any slow loading: bad values fail fast
  from lmdm_jax.data.audio import WavWriter, save_npy
  from lmdm_jax.system import load_system
  import time
  try:
    system = load_system(args.checkpoint, config=args.config, codec=args.codec, t5=args.t5,
                         vae=args.vae, seed=args.seed, quantize=args.quantize,
                         log=print)
    t0 = time.perf_counter()
    stream = system.stream(prompts[0].text, seed=args.seed, sketch=args.sketch,
                           seconds=args.seconds, steps=args.steps, cfg_scale=args.cfg_scale,
                           plus_plus=args.plus_plus or None,
                           pingpong=None if args.sampler is None else args.sampler == "pingpong",
                           regime=args.regime, limiter=not args.no_limiter)
  except ValueError as e:  # the named source, config or a sampler setting cannot be used
    raise C.UsageError(str(e)) from e
  if system.conditioning_note:
    total = stream.seconds_total if stream.seconds_total is not None else system.seconds_total
    print(f"[sample] conditioning: {system.conditioning_note}; seconds_start "
          f"{system.seconds_start:g}, seconds_total {total:g}")
  if len(prompts) > 1 and not system.streams:
    raise C.UsageError("a base model generates the whole clip at once: give one --prompt")
  cfg, codec, st = system.cfg, system.codec, stream.settings
  frame_rate, block_s = system.frame_rate, system.block_seconds
  n_blocks = system.blocks_for(args.seconds)
  for p in prompts:
    if p.start >= n_blocks * block_s:
      print(f"[sample] note: prompt {p.text!r} at {p.start:g} s is past the end "
            f"({n_blocks * block_s:.1f} s) and is never used")
  sched = C.prompt_schedule(prompts, block_s, n_blocks)
  if args.sketch:
    feats = stream.sketch_features
    voiced = float(feats[:, 0].mean()) if len(feats) else 0.0
    print(f"[sketch] {args.sketch}: {len(feats)} frames, {100 * voiced:.0f}% voiced -> the last "
          f"{feats.shape[1]} of {cfg.extra_dim} extra channels")
  if cfg.extra_dim and not args.sketch:
    print(f"[sample] the model has {cfg.extra_dim} extra input channels (accompaniment / sketch);"
          " they are left at zero")
  if codec is not None and stream.fused is None:  # else the block program decodes
    C.warm_decoder(codec, 4 * cfg.chunk)
  print(f"[sample] compiled the block step{' and the decoder' if codec is not None else ''} in "
        f"{time.perf_counter() - t0:.1f} s (regime {st.regime}, {st.steps} steps, CFG "
        f"{st.cfg_scale}{'++' if st.plus_plus else ''}, {cfg.chunk}-frame blocks of {block_s:.2f} s)")
  if len(prompts) > 1:
    print("[sample] prompts: " + "; ".join(f"{p.start:g} s: {p.text!r}" for p in prompts))

  # the output goes to a partial file, renamed over --out only when the run completes
  out = args.out if codec is not None else latents_path(args.out)
  latents = []
  writer = player = None
  decoding = codec is not None
  if codec is not None:
    wav_bytes = n_blocks * block_s * codec.sample_rate * codec.channels * 2
    writer = WavWriter(out, codec.sample_rate, codec.channels,
                       format="RF64" if wav_bytes > 2 ** 32 - 2 ** 24 else "WAV")
    if args.play:
      player = open_player(codec.sample_rate, codec.channels)
  elif args.play:
    print("[sample] --play: nothing to play without a codec")

  def emit(audio):
    if audio.shape[-1]:
      if not np.all(np.isfinite(audio)):
        raise NonFiniteOutput("the decoder produced NaN or infinite audio")
      audio = stream.limit(audio)
      writer.append(audio)
      if player is not None:
        player.write(np.ascontiguousarray(audio.T, np.float32))

  bar = None
  if not args.no_progress:
    from tqdm import tqdm
    bar = tqdm(total=n_blocks, unit="block", desc="[sample]", file=sys.stderr, dynamic_ncols=True)
  rtf = C.RTF()
  interrupted = complete = False
  failure = None
  done = 0

  def say(msg):
    (bar.write(msg) if bar is not None else print(msg))

  def produce():
    nonlocal done
    cur = 0
    for k in range(n_blocks):
      if sched[k] != cur:
        cur = sched[k]
        stream.set_prompt(prompts[cur].text)
        say(f"[sample] {k * block_s:.1f} s: prompt -> {prompts[cur].text!r}")
      try:
        out = stream.next_block() if decoding else stream.next_latents()
      except FloatingPointError:
        raise NonFiniteOutput(f"block {k} ({k * block_s:.1f} s): the model produced NaN or "
                              "infinite latents") from None
      if decoding:
        emit(out)
      else:
        latents.append(out)
      done += 1
      rtf.add(block_s)
      if bar is not None:
        bar.set_postfix_str(f"{rtf.value:.2f}x real time", refresh=False)
        bar.update(1)
    if decoding:
      emit(stream.flush())

  try:
    produce()
    complete = True
  except KeyboardInterrupt:
    interrupted = True
    say(f"[sample] interrupted after {done} blocks: keeping what was made")
    if decoding:
      try:
        emit(stream.flush())
      except (KeyboardInterrupt, NonFiniteOutput):
        pass
  except NonFiniteOutput as e:
    failure = str(e)
  finally:
    if bar is not None:
      bar.close()
    if player is not None:
      player.stop()
      player.close()
    if codec is not None:
      if complete:
        writer.commit()
      else:
        writer.close()
      where = writer.written_path
    else:
      lat = np.concatenate(latents, axis=0) if latents else np.zeros((0, cfg.io_channels), np.float32)
      where = save_npy(out, lat, partial=not complete)
    kept = (f"{writer.seconds_written:.2f} s" if codec is not None
            else f"{lat.shape[0] / frame_rate:.2f} s of latents")
    untouched = f"{out} was not changed" if os.path.exists(out) else f"{out} was not written"
    partial_note = f"the partial output ({kept}) is in {where}; {untouched}"
    if not (complete or interrupted or failure):  # an unexpected error: its traceback follows
      print(f"[sample] stopped by an error: {partial_note}", file=sys.stderr)
  if failure:
    print(f"sample.py: error: {failure}; {partial_note}", file=sys.stderr)
    return 1
  if interrupted:
    print(f"[sample] {partial_note}")
    return 130
  final_rtf = rtf.value
  if stream.limiter is not None and stream.limiter.report():
    print(stream.limiter.report())
  if codec is not None:
    print(f"[sample] wrote {writer.seconds_written:.2f} s ({codec.sample_rate} Hz, "
          f"{codec.channels} ch) to {where}; real-time factor {final_rtf:.2f}x including decode")
  else:
    print(f"[sample] wrote {lat.shape[0]} latent frames x {lat.shape[1]} channels "
          f"({lat.shape[0] / frame_rate:.1f} s) to {where}; real-time factor {final_rtf:.2f}x")
  return 0


def entry():
  """The command (``sample.py``, ``lmdm sample``): Ctrl-C works even where the shell ignores it."""
  if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:  # background shells ignore SIGINT
    signal.signal(signal.SIGINT, signal.default_int_handler)
  sys.exit(main())


if __name__ == "__main__":
  entry()
