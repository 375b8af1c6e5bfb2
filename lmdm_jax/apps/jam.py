"""The jam command: a partner's recording in, the model's part and the duet out (the jamming
session itself, the "generative delay", is ``lmdm_jax.jamming.JamSession``).

By default the file is rendered offline: block k sees exactly the partner audio a live session
has when block k starts, nothing runs against a clock, and the output is what a live session
makes when its compute keeps up, however slow this machine is. ``--realtime`` instead plays the
file into a live session on the real clock, in buffers of ``--buffer`` samples, as a sound card
would; a session that cannot keep up then says so, with by how much.

  lmdm jam --input partner.wav --out duet.wav [--part generated.wav]
  lmdm jam --input partner.wav --realtime          # simulate the live clock
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from lmdm_jax.jamming import JamSession  # noqa: F401 (the session, for callers of this module)


MAX_DELAY_BLOCKS = 64
BUFFER_RANGE = (16, 1 << 16)


def _check_args(args):
  """Every value that can be checked before a model is loaded (UsageError on the first bad one)."""
  import os

  from lmdm_jax.apps import checks as K
  K.input_file("--input", args.input)
  if args.seconds is not None:
    K.seconds("--seconds", args.seconds)
  K.steps(args.steps)
  if args.cfg_scale is not None:
    K.number("--cfg-scale", args.cfg_scale)
  K.number("--delay-blocks", args.delay_blocks, lo=1, hi=MAX_DELAY_BLOCKS)
  K.number("--buffer", args.buffer, *BUFFER_RANGE)
  K.seed(args.seed)
  K.text("--prompt", args.prompt)
  K.codec(args.codec)
  if args.checkpoint:
    K.input_file("--checkpoint", args.checkpoint)
  part = args.part or os.path.splitext(args.out)[0] + "_part.wav"
  inputs = {"--input": args.input, "--checkpoint": args.checkpoint}
  K.output("--out", args.out, inputs)
  K.output("--part", part, dict(inputs, **{"--out": args.out}))
  if args.config is not None:
    K.config(args.config)
  return part


def build_parser():
  ap = argparse.ArgumentParser(prog="lmdm jam", description=__doc__,
                               formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--input", required=True, help="the partner's audio (any format; required)")
  ap.add_argument("--out", default="outputs/duet.wav",
                  help="the mix: partner + model, as heard live (written as OUT.partial.wav, "
                       "renamed to OUT when complete; default: outputs/duet.wav)")
  ap.add_argument("--part", default=None,
                  help="the model's part alone (default: OUT with _part before the extension)")
  ap.add_argument("--checkpoint", default=None, metavar="SOURCE",
                  help="the model (a bundle, work directory or converted checkpoint) with "
                       "accompaniment channels (default: the bundled trained model)")
  ap.add_argument("--config", default=None,
                  help="a config with accompaniment channels: without --checkpoint, RANDOM "
                       "weights; with one, overrides the config it records (default: none)")
  ap.add_argument("--prompt", default=DEFAULT_JAM_PROMPT,
                  help=f"text prompt (default: {DEFAULT_JAM_PROMPT!r})")
  ap.add_argument("--codec", default=None, help="codec name (default: the model's)")
  ap.add_argument("--delay-blocks", type=int, default=2,
                  help=f"the generative delay in blocks, 1..{MAX_DELAY_BLOCKS} (default: 2)")
  ap.add_argument("--steps", type=int, default=None,
                  help="denoising steps per block (default: the model's)")
  ap.add_argument("--cfg-scale", type=float, default=None,
                  help="classifier-free guidance scale (default: the model's)")
  ap.add_argument("--seconds", type=float, default=None,
                  help="cut the input to this length (default: all of it)")
  ap.add_argument("--realtime", action="store_true",
                  help="play the input into a live session on the real clock instead of "
                       "rendering offline (default: offline)")
  ap.add_argument("--buffer", type=int, default=1024,
                  help=f"with --realtime: audio callback size in samples ({BUFFER_RANGE[0]}.."
                       f"{BUFFER_RANGE[1]}; default: 1024)")
  ap.add_argument("--quantize", choices=["none", "int8"], default="none",
                  help="int8: run the DiT's block linears as dynamic int8 (int8 weights per output "
                  "channel, activations per token; a CPU speed option, see docs/STREAMING.md); "
                  "default: none (the model's dtype)")
  ap.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
  return ap


# the duet captions of the training data: "<instrument> part. <caption>"
DEFAULT_JAM_PROMPT = "Cello part. String quartet playing a lively piece. G major, 4/4 time, 120 BPM."


def main(argv=None):
  args = build_parser().parse_args(argv)
  from lmdm_jax.apps import checks as K
  from lmdm_jax.apps.common import UsageError
  tag = "[jam]"
  try:
    return _run(args, tag)
  except UsageError as e:
    print(f"{tag} error: {K.one_line(e)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:  # before the session started: nothing was written
    print(f"{tag} interrupted before any output was written", file=sys.stderr)
    return 130


def _run(args, tag):
  import os

  from lmdm_jax import compile_cache
  from lmdm_jax.apps import checks as K
  from lmdm_jax.apps import common as C
  from lmdm_jax.data.audio import AudioFileError, WavWriter, load_audio
  part_path = _check_args(args)
  try:  # checked before the model loads; decoded again at the codec's rate below
    load_audio(args.input, duration=args.seconds)
  except AudioFileError as e:
    raise C.UsageError(f"--input {e}") from e
  compile_cache.enable(log=lambda m: print(f"{tag} {m}"))
  from lmdm_jax.system import load_system
  t0 = time.perf_counter()
  try:
    system = load_system(args.checkpoint, config=args.config, codec=args.codec, seed=args.seed,
                         quantize=args.quantize)
    if system.codec is None:
      raise C.UsageError("jamming needs a codec that matches the model")
    codec = system.codec
    sess = system.jam(args.prompt, delay_blocks=args.delay_blocks, steps=args.steps,
                      cfg_scale=args.cfg_scale, seed=args.seed)
  except ValueError as e:  # the named source or config, or a setting this model cannot use
    raise C.UsageError(str(e)) from e
  partner = load_audio(args.input, sample_rate=codec.sample_rate, channels=codec.channels,
                       duration=args.seconds)
  how = "in real time (--realtime)" if args.realtime else "offline"
  print(f"{tag} ready in {time.perf_counter() - t0:.1f} s: delay {sess.delay_seconds:.2f} s "
        f"({args.delay_blocks} blocks of {sess.block_seconds:.2f} s + decoder "
        f"{sess.decoder_latency / codec.sample_rate:.2f} s); jamming along with "
        f"{partner.shape[1] / codec.sample_rate:.1f} s of {args.input} {how}")
  n_total = partner.shape[1] + sess.delay_samples  # let the model finish the last bars
  buf = args.buffer
  interrupted = complete = False
  failure = None
  # both outputs go to partial files, renamed over --out / --part only when the run completes
  duet = WavWriter(args.out, codec.sample_rate, codec.channels)
  part = WavWriter(part_path, codec.sample_rate, codec.channels)
  pos = 0
  try:
    if not args.realtime:
      y_all = sess.render(partner)
      if not np.all(np.isfinite(y_all)):
        raise RuntimeError("the model's part has NaN or infinite samples")
      x_all = np.pad(partner, ((0, 0), (0, n_total - partner.shape[1])))
      part.append(y_all)
      duet.append(np.clip(0.5 * (x_all + y_all), -1, 1))
      s = sess.stats()
      pos = n_total
    else:
      sess.start()
    t_start = time.perf_counter()
    try:
      while pos < n_total:
        target = t_start + (pos + buf) / codec.sample_rate  # a callback every `buf` samples
        x = partner[:, pos:pos + buf]
        if x.shape[1] < buf:
          x = np.pad(x, ((0, 0), (0, buf - x.shape[1])))
        sess.push(x)
        y = sess.pull(buf)
        if not np.all(np.isfinite(y)):
          raise RuntimeError("the model's part has NaN or infinite samples")
        m = min(buf, n_total - pos)
        part.append(y[:, :m])
        duet.append(np.clip(0.5 * (x[:, :m] + y[:, :m]), -1, 1))
        pos += buf
        dt = target - time.perf_counter()
        if dt > 0:
          time.sleep(dt)
    finally:
      try:
        sess.close()
      finally:
        s = sess.stats()
    complete = True
  except KeyboardInterrupt:
    interrupted = True
    print(f"{tag} interrupted: keeping what was made")
  except (RuntimeError, FloatingPointError) as e:  # the sampler failed, or non-finite output
    failure = str(e) if e.__cause__ is None else f"{e}: {e.__cause__}"
  finally:
    for w in (duet, part):
      if complete:
        w.commit()
      else:
        w.close()
    if not complete:
      notes = "; ".join(f"{w.path} was not changed" if os.path.exists(w.path)
                        else f"{w.path} was not written" for w in (duet, part))
      note = (f"the partial output ({duet.seconds_written:.1f} s) is in {duet.partial_path} and "
              f"{part.partial_path}; {notes}")
      if failure:
        print(f"{tag} error: {K.one_line(failure)}; {note}", file=sys.stderr)
      elif interrupted:
        print(f"{tag} {note}")
      else:  # an unexpected error: its traceback follows
        print(f"{tag} stopped by an error: {note}", file=sys.stderr)
  if failure:
    return 1
  if interrupted:
    return 130
  print(f"{tag} wrote {args.out} (mix, {duet.seconds_written:.1f} s) and {part_path}")
  print(f"{tag} delay {s['delay_seconds']:.2f} s, {s['blocks']} blocks, block compute "
        f"{1000 * s['mean_block_compute_s']:.0f} ms mean / {1000 * s['max_block_compute_s']:.0f} "
        f"ms max for {1000 * s['block_seconds']:.0f} ms blocks (compute at "
        f"{s['real_time_factor']:.1f}x real time)" + (
            f", deadline misses {s['deadline_misses']}, under-runs {s['underruns']} "
            f"({s['underrun_seconds']:.2f} s)" if args.realtime else ""))
  warning = sess.keep_up_report() if args.realtime else None
  if warning:
    print(f"{tag} {warning}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
