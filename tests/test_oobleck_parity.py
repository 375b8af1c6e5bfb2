"""Parity of lmdm_jax.nn.oobleck / lmdm_jax.convert.oobleck with stable-audio-tools 0.0.20.

Tiny random configs, fp32, CPU. Max abs differences are printed (run with -s to see them).
"""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import torch_reference

torch = torch_reference.require_torch()
sat = torch_reference.stable_audio_tools()

from lmdm_jax.convert import oobleck as conv  # noqa: E402
from lmdm_jax.nn import oobleck  # noqa: E402

TOL = 1e-5
# stable-audio-tools builds its convs with the deprecated torch.nn.utils.weight_norm.
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")]


def tiny_config(use_snake=True, final_tanh=False, scale=1.0):
  """A pretransform dict like Stable Audio Open's, shrunk: channels 8, strides 2,2, latent 4."""
  cfg = copy.deepcopy(oobleck.STABLE_AUDIO_OPEN_VAE)
  ae = cfg["config"]
  for part in ("encoder", "decoder"):
    ae[part]["config"].update(channels=8, c_mults=[1, 2], strides=[2, 2], use_snake=use_snake)
  ae["encoder"]["config"]["latent_dim"] = 8
  ae["decoder"]["config"]["latent_dim"] = 4
  ae["decoder"]["config"]["final_tanh"] = final_tanh
  ae.update(latent_dim=4, downsampling_ratio=4)
  if scale != 1.0:
    cfg["scale"] = scale
  return cfg


def make_reference(cfg, seed=0):
  """The stable-audio-tools pretransform with every parameter randomized (snake and biases too)."""
  torch.manual_seed(seed)
  pt = sat.create_pretransform_from_config(copy.deepcopy(cfg), 44100).eval()
  with torch.no_grad():
    for name, p in pt.model.named_parameters():
      if name.endswith(("alpha", "beta")):
        p.copy_(0.3 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  return pt


def to_parametrizations(module):
  """Moves every old-style weight norm (weight_g/weight_v) to torch.nn.utils.parametrizations."""
  for m in module.modules():
    if hasattr(m, "weight_g"):
      torch.nn.utils.remove_weight_norm(m)
      torch.nn.utils.parametrizations.weight_norm(m)
  return module


def load_flax(cfg, state_dict):
  vae = oobleck.OobleckVAE.from_pretransform(cfg, nnx.Rngs(123))
  report = conv.load_torch_state_dict(vae, state_dict)
  assert report == {"missing": [], "unexpected": []}
  return vae


def prefixed(sd, prefix="pretransform.model."):
  return {prefix + k: v for k, v in sd.items()}


def t2j(x):
  """torch (B, C, T) -> jax (B, T, C)."""
  return jnp.asarray(x.detach().numpy().transpose(0, 2, 1))


def maxdiff(jax_out, torch_out):
  return float(np.max(np.abs(np.asarray(jax_out) - torch_out.detach().numpy().transpose(0, 2, 1))))


@pytest.fixture(scope="module", params=[(True, False, 1.0), (False, True, 1.7)],
                ids=["snake", "elu_tanh_scaled"])
def setup(request):
  cfg = tiny_config(*request.param)
  pt = make_reference(cfg)
  vae = load_flax(cfg, prefixed(pt.model.state_dict()))
  torch.manual_seed(1)
  audio = torch.randn(2, 2, 64)
  latents = torch.randn(2, 4, 16)
  return cfg, pt, vae, audio, latents


def test_encoder_decoder_parity(setup):
  cfg, pt, vae, audio, latents = setup
  with torch.no_grad():
    enc = pt.model.encoder(audio)
    dec = pt.model.decoder(latents)
  d_enc = maxdiff(vae.encoder(t2j(audio)), enc)
  d_dec = maxdiff(vae.decoder(t2j(latents)), dec)
  print(f"\nencoder max abs diff {d_enc:.3g}, decoder max abs diff {d_dec:.3g}")
  assert enc.shape == (2, 8, 16) and d_enc <= TOL
  assert dec.shape == (2, 2, 64) and d_dec <= TOL


def test_full_encode_decode_parity(setup, monkeypatch):
  cfg, pt, vae, audio, latents = setup
  with torch.no_grad():
    mean = pt.model.encoder(audio).chunk(2, dim=1)[0] / pt.scale
    recon = pt.decode(mean)
  z = vae.encode(t2j(audio))
  d_mean = maxdiff(z, mean)
  d_recon = maxdiff(vae.decode(z), recon)
  print(f"\nencode(mean) max abs diff {d_mean:.3g}, decode(encode) max abs diff {d_recon:.3g}")
  assert d_mean <= TOL and d_recon <= TOL

  # A posterior sample: the reference draws its noise with torch.randn_like; feed it ours.
  key = jax.random.key(7)
  sampled = vae.encode(t2j(audio), sample=True, key=key)
  noise = np.asarray(jax.random.normal(key, sampled.shape, jnp.float32)).transpose(0, 2, 1)
  monkeypatch.setattr(torch, "randn_like", lambda x: torch.from_numpy(noise.copy()))
  with torch.no_grad():
    ref_sample = pt.encode(audio)
  d_sample = maxdiff(sampled, ref_sample)
  print(f"encode(sample) max abs diff {d_sample:.3g}")
  assert d_sample <= TOL
  with pytest.raises(ValueError):
    vae.encode(t2j(audio), sample=True)


def test_parametrizations_layout():
  cfg = tiny_config()
  pt = make_reference(cfg, seed=3)
  audio = torch.randn(1, 2, 32)
  with torch.no_grad():
    before = pt.decode(pt.model.encoder(audio).chunk(2, dim=1)[0])
  to_parametrizations(pt.model)
  sd = pt.model.state_dict()
  assert any(k.endswith("parametrizations.weight.original0") for k in sd)
  assert not any(k.endswith("weight_g") for k in sd)
  vae = load_flax(cfg, sd)  # bare encoder./decoder. keys this time
  with torch.no_grad():
    mean = pt.model.encoder(audio).chunk(2, dim=1)[0]
    recon = pt.decode(mean)
  assert float((recon - before).abs().max()) < 1e-5
  d = maxdiff(vae.decode(vae.encode(t2j(audio))), recon)
  print(f"\nparametrizations layout: decode(encode) max abs diff {d:.3g}")
  assert d <= TOL


def test_converter_coverage_and_round_trip():
  cfg = tiny_config()
  pt = make_reference(cfg, seed=5)
  torch_sd = pt.model.state_dict()
  vae = load_flax(cfg, prefixed(torch_sd))
  # Every PyTorch key has a Flax counterpart and back, with the same shapes.
  ours = conv.to_torch_state_dict(vae)
  assert set(ours) == set(torch_sd)
  assert all(tuple(ours[k].shape) == tuple(torch_sd[k].shape) for k in ours)
  # The exported state_dict loads strictly into the reference and computes the same thing.
  ref2 = make_reference(cfg, seed=9)
  ref2.model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ours.items()}, strict=True)
  latents = torch.randn(1, 4, 8)
  with torch.no_grad():
    d = float((ref2.decode(latents) - pt.decode(latents)).abs().max())
  assert d <= TOL
  # Flax -> PyTorch -> Flax is bit-exact, for every layout.
  flat = lambda m: {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  for layout in ("weight_norm", "parametrizations", "plain"):
    back = load_flax(cfg, conv.to_torch_state_dict(vae, layout=layout, prefix="pretransform.model."))
    a, b = flat(vae), flat(back)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a), layout


def test_bad_keys_raise():
  cfg = tiny_config()
  vae = oobleck.OobleckVAE.from_pretransform(cfg)
  good = conv.to_torch_state_dict(vae)
  name = "decoder.layers.0.weight_g"

  with pytest.raises(ValueError, match="unexpected keys.*encoder.extra"):
    conv.load_torch_state_dict(vae, {**good, "encoder.extra": np.zeros(1)})
  missing = {k: v for k, v in good.items() if not k.startswith("decoder.layers.0.")}
  with pytest.raises(ValueError, match="missing keys.*decoder.layers.0.weight"):
    conv.load_torch_state_dict(vae, missing)
  with pytest.raises(ValueError, match="wrongly shaped.*decoder.layers.0.bias"):
    conv.load_torch_state_dict(vae, {**good, "decoder.layers.0.bias": np.zeros(3)})
  with pytest.raises(ValueError, match="needs both"):
    conv.load_torch_state_dict(vae, {k: v for k, v in good.items() if k != name})
  # Nothing was written by the failed calls; the allow_* flags accept and report.
  report = conv.load_torch_state_dict(vae, {**missing, "x.y": np.zeros(1)}, allow_missing=True,
                                      allow_unexpected=True)
  assert report["unexpected"] == ["x.y"]
  assert report["missing"] == ["decoder.layers.0.weight", "decoder.layers.0.bias"]


def test_stable_audio_open_geometry():
  """Full-size key names and shapes (torch on the meta device, Flax abstract): they all match."""
  cfg = oobleck.STABLE_AUDIO_OPEN_VAE
  with torch.device("meta"):
    ref = sat.create_pretransform_from_config(copy.deepcopy(cfg), 44100)
  ref_shapes = {k: tuple(v.shape) for k, v in ref.model.state_dict().items()}
  abstract = nnx.eval_shape(lambda: oobleck.OobleckVAE.from_pretransform(cfg))
  ours = {}
  for name, mod in conv._param_modules(abstract):
    if isinstance(mod, oobleck.SnakeBeta):
      ours[f"{name}.alpha"] = ours[f"{name}.beta"] = tuple(mod.alpha.get_value().shape)
      continue
    k, cin, cout = mod.kernel.get_value().shape
    transposed = isinstance(mod, oobleck.ConvTranspose1d)
    ours[f"{name}.weight_v"] = (cin, cout, k) if transposed else (cout, cin, k)
    ours[f"{name}.weight_g"] = ((cin if transposed else cout), 1, 1)
    if conv._has_bias(mod):
      ours[f"{name}.bias"] = (cout,)
  assert ours == ref_shapes
  vae_cfg = oobleck.VAEConfig.from_pretransform(cfg)
  assert (vae_cfg.hop, vae_cfg.latent_dim, vae_cfg.io_channels) == (2048, 64, 2)
  assert oobleck.decoder_receptive_field(vae_cfg.decoder) == (18981, 18981)
  assert oobleck.stream_margins(vae_cfg.decoder) == (10, 10)


def test_receptive_field_is_measured_exactly():
  """The analytic receptive field equals the measured support of d(audio)/d(one latent frame)."""
  cfg = oobleck.OobleckConfig(io_channels=1, channels=2, c_mults=(1, 2), strides=(2, 4),
                              latent_dim=2, use_snake=True, final_tanh=False)
  dec = oobleck.OobleckDecoder(cfg, nnx.Rngs(1))
  hop, frames, c = 8, 48, 24
  z = jax.random.normal(jax.random.key(0), (1, frames, 2))
  jac = jax.jit(jax.jacfwd(lambda dz: dec(z.at[0, c].add(dz))))(jnp.zeros(2))
  hit = np.nonzero(np.abs(np.asarray(jac)).sum(axis=(0, 2, 3)) > 0)[0]
  measured = (int(c * hop - hit.min()), int(hit.max() - ((c + 1) * hop - 1)))
  print(f"\nmeasured receptive field {measured}, analytic "
        f"{oobleck.decoder_receptive_field(cfg)}, margins {oobleck.stream_margins(cfg)}")
  assert measured == oobleck.decoder_receptive_field(cfg)


def test_streaming_decode_equals_full_decode():
  cfg = tiny_config()
  vae = load_flax(cfg, prefixed(make_reference(cfg, seed=11).model.state_dict()))
  left, right = oobleck.stream_margins(vae.cfg.decoder)
  z = np.asarray(jax.random.normal(jax.random.key(3), (150, 4)), np.float32)
  full = np.asarray(vae.decode(jnp.asarray(z)[None]))[0]
  stream = oobleck.StreamingDecoder(vae)
  pieces, pos = [], 0
  for n in (5, 70, 1, 74):
    pieces.append(stream.push(z[pos:pos + n]))
    pos += n
  pieces.append(stream.flush())
  out = np.concatenate(pieces, axis=0)
  assert pos == 150 and out.shape == full.shape
  d = float(np.max(np.abs(out - full)))
  print(f"\nstreaming margins left={left} right={right} frames; max abs diff vs full {d:.3g}")
  assert d <= 1e-4
  # Too little context is visibly wrong: the margins are needed.
  short = oobleck.StreamingDecoder(vae, left=1, right=1)
  out_short = np.concatenate([short.push(z[:75]), short.push(z[75:]), short.flush()])
  assert float(np.max(np.abs(out_short - full))) > 1e-4


def test_codec_wrapper():
  from lmdm_jax.codecs.oobleck import OobleckCodec
  cfg = tiny_config()
  pt = make_reference(cfg, seed=13)
  codec = OobleckCodec.from_state_dict(prefixed(pt.model.state_dict()), cfg)
  assert (codec.sample_rate, codec.channels, codec.hop, codec.latent_dim) == (44100, 2, 4, 4)
  audio = np.asarray(torch.randn(2, 4 * 30 + 3))  # cut to 30 frames
  z = codec.encode(audio)
  with torch.no_grad():
    ref_z = pt.model.encoder(torch.from_numpy(audio[None, :, :120])).chunk(2, dim=1)[0][0]
    ref_audio = pt.decode(ref_z[None])[0].numpy()
  assert z.shape == (30, 4) and float(np.max(np.abs(z - ref_z.numpy().T))) <= TOL
  audio_out = codec.decode(z)
  assert audio_out.shape == (2, 120) and float(np.max(np.abs(audio_out - ref_audio))) <= TOL
  stream = codec.stream_decoder()
  out = np.concatenate([stream.push(z[:12]), stream.push(z[12:]), stream.flush()], axis=1)
  assert float(np.max(np.abs(out - audio_out))) <= 1e-4
  assert codec.encode(audio[None]).shape == (1, 30, 4)
  with pytest.raises(ValueError):
    codec.encode(audio[:1])
