"""lmdm_jax.limiter: bounded, counted, exact below the threshold; the System's stream applies it."""
import numpy as np
import pytest

from lmdm_jax.limiter import SoftLimiter, make_limiter

pytestmark = pytest.mark.slow  # streams through the limiter (the full suite runs them)


def test_identity_below_the_threshold():
  x = np.linspace(-0.9, 0.9, 10001).astype(np.float32)
  lim = SoftLimiter(0.9)
  y = lim(x)
  np.testing.assert_array_equal(y, x)  # exactly, not approximately
  assert lim.limited == 0 and lim.samples == x.size and lim.report() is None


def test_bounds_and_counts():
  lim = SoftLimiter(0.9)
  x = np.array([[0.5, 0.95, -1.5, 167.0], [-0.9, 0.91, 3.0, -1e6]], np.float32)
  y = lim(x)
  assert y.shape == x.shape and y.dtype == np.float32
  assert np.all(np.abs(y) <= 1.0)
  assert lim.limited == 6 and lim.samples == 8
  over = np.abs(x) > 0.9
  np.testing.assert_array_equal(y[~over], x[~over])
  assert np.all(np.sign(y) == np.sign(x)) and np.all(np.abs(y[over]) > 0.9)
  assert np.all(np.abs(y[over]) < np.abs(x[over]))
  # monotonic and continuous at the knee
  r = np.linspace(0.89, 5, 4000).astype(np.float32)
  z = SoftLimiter(0.9)(r)
  assert np.all(np.diff(z) >= 0) and abs(z[np.searchsorted(r, 0.9001)] - 0.9001) < 1e-3
  lim(np.full(8, 2.0, np.float32))  # counts add up over calls
  assert lim.limited == 14 and lim.samples == 16
  assert lim.report() == "[limiter] 14 samples (88%) limited"


def test_make_limiter_and_bad_threshold():
  assert make_limiter(None) is None and make_limiter(False) is None
  assert isinstance(make_limiter(True), SoftLimiter)
  own = SoftLimiter()
  assert make_limiter(own) is own
  with pytest.raises(ValueError, match="between 0 and 1"):
    SoftLimiter(1.0)
  with pytest.raises(ValueError, match="limiter must be"):
    make_limiter("yes")


def test_system_stream_limits_and_counts(tmp_path):
  from lmdm_jax import load_system
  from tests.test_sample_cli import write_config
  system = load_system(config=write_config(tmp_path / "tinyspectral.py"), log=lambda m: None)
  assert system.codec is not None
  raw = system.generate("a prompt", seconds=1.0, seed=3)
  assert system.stream("a prompt").limiter is None  # off by default
  # a knee at the raw output's median level, so that half of it is limited
  knee = float(np.median(np.abs(raw)))
  lim = SoftLimiter(knee)
  out = system.generate("a prompt", seconds=1.0, seed=3, limiter=lim)
  assert out.shape == raw.shape and np.all(np.abs(out) <= 1.0)
  over = np.abs(raw) > knee
  assert lim.limited >= int(over.sum()) > 0  # generate() may decode past the trimmed end
  np.testing.assert_array_equal(out[~over], raw[~over])
  assert np.all(np.abs(out[over]) <= np.abs(raw[over])) and np.all(np.abs(out[over]) >= knee)
  np.testing.assert_array_equal(out, SoftLimiter(knee)(raw))  # the decoded output, limited
  stream = system.stream("a prompt", seed=3, limiter=True)
  blocks = [stream.next_block() for _ in range(system.blocks_for(1.0))] + [stream.flush()]
  # the same samples through the default limiter (knee 0.9), streamed block by block
  streamed = np.concatenate(blocks, axis=1)[:, :raw.shape[1]]
  np.testing.assert_array_equal(streamed, SoftLimiter()(raw))
  assert stream.limiter.limited >= int((np.abs(raw) > 0.9).sum())


def test_sample_cli_prints_the_limited_count(tmp_path, capsys, monkeypatch):
  """sample.py limits by default and says how many samples it limited (a low knee here, so that
  a random model's quiet output is limited); --no-limiter writes the raw output, silently."""
  import soundfile as sf
  from lmdm_jax import limiter
  from lmdm_jax.apps import sample_cli
  from tests.test_sample_cli import write_config
  cfg = write_config(tmp_path / "tinyspectral.py")
  real = limiter.make_limiter
  monkeypatch.setattr(limiter, "make_limiter",
                      lambda v: SoftLimiter(1e-3) if v is True else real(v))
  runs = {}
  for flag in ([], ["--no-limiter"]):
    out = str(tmp_path / f"out{len(flag)}.wav")
    assert sample_cli.main(["--config", cfg, "--seconds", "1", "--no-progress", "--out", out,
                            *flag]) == 0
    runs[bool(flag)] = (capsys.readouterr().out, sf.read(out)[0])
  text, limited = runs[False]
  line = next(x for x in text.splitlines() if x.startswith("[limiter] "))
  n = int(line.split()[1])
  raw = runs[True][1]
  assert "[limiter]" not in runs[True][0]
  assert n >= int((np.abs(raw) > 2e-3).sum()) > 0 and line.endswith("limited")
  assert np.abs(limited).max() < np.abs(raw).max()
