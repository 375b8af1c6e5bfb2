"""Parity of lmdm_jax.nn.t5 / lmdm_jax.convert.t5 with Hugging Face ``T5EncoderModel``.

A tiny random T5 is saved with ``save_pretrained`` next to a word-level tokenizer built offline
with the ``tokenizers`` package; fp32, CPU. Max abs differences are printed (-s to see them).
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import torch_reference

torch = torch_reference.require_torch()
transformers = torch_reference.transformers()

from lmdm_jax.convert import t5 as convert_t5  # noqa: E402
from lmdm_jax.nn import t5  # noqa: E402

pytestmark = pytest.mark.slow

TOL = 1e-5
WORDS = ("a calm piano melody with soft strings and warm bass over slow drums in the night "
         "bright synth lead fast techno beat").split()


def tiny_hf_config(ff):
  return transformers.T5Config(
    vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=1, num_heads=4,
    relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
    feed_forward_proj=ff, pad_token_id=0, eos_token_id=1)


def save_word_tokenizer(path):
  """A word-level tokenizer.json: <pad> 0, </s> 1, <unk> 2, then WORDS; adds </s> like T5's."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                     special_tokens=[("</s>", 1)])
  tok.save(os.path.join(path, "tokenizer.json"))


@pytest.fixture(scope="module", params=["relu", "gated-gelu"])
def t5_dir(request, tmp_path_factory):
  path = str(tmp_path_factory.mktemp(f"t5_{request.param}"))
  torch.manual_seed(0)
  model = transformers.T5EncoderModel(tiny_hf_config(request.param)).eval()
  with torch.no_grad():  # the norms start at 1 and the bias table small: make them matter
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif "relative_attention_bias" in name:
        p.copy_(torch.randn_like(p))
  model.save_pretrained(path)
  save_word_tokenizer(path)
  return path, model


PROMPTS = ["a calm piano melody", "", "fast techno beat with warm bass and bright synth lead",
           " ".join(WORDS * 5)]  # the last one is longer than 64 tokens


def test_buckets_match_hf():
  bucket_fn = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
  for q, k, nb, md in ((64, 64, 32, 128), (300, 300, 32, 128), (64, 64, 8, 16)):
    rel = torch.arange(k)[None, :] - torch.arange(q)[:, None]
    ref = bucket_fn(rel, bidirectional=True, num_buckets=nb, max_distance=md).numpy()
    np.testing.assert_array_equal(t5.relative_position_buckets(q, k, nb, md), ref)


def test_tokenizer_matches_hf(t5_dir):
  path, _ = t5_dir
  ours = convert_t5.load_tokenizer(path, 64)
  ref = transformers.PreTrainedTokenizerFast(
    tokenizer_file=os.path.join(path, "tokenizer.json"), pad_token="<pad>", eos_token="</s>",
    unk_token="<unk>")
  enc = ref(PROMPTS, truncation=True, max_length=64, padding="max_length", return_tensors="np")
  ids, mask = ours(PROMPTS)
  assert ids.shape == mask.shape == (4, 64) and mask.dtype == bool
  np.testing.assert_array_equal(ids, enc["input_ids"])
  np.testing.assert_array_equal(mask, enc["attention_mask"].astype(bool))
  assert mask[3].all() and ids[3, -1] == 1  # truncated, still closed by </s>


def test_encoder_and_conditioner_match_hf(t5_dir):
  path, model = t5_dir
  cond = convert_t5.load_conditioner(path)
  ids, mask = cond.tokenizer(PROMPTS)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
  hidden = np.asarray(cond.encoder(jnp.asarray(ids), jnp.asarray(mask)))
  d_enc = float(np.max(np.abs(hidden - ref)))
  tokens, out_mask = cond(PROMPTS)
  tokens = np.asarray(tokens)
  d_cond = float(np.max(np.abs(tokens - ref * mask[..., None])))
  print(f"\nT5 ({model.config.feed_forward_proj}) last_hidden_state max abs diff {d_enc:.3g}, "
        f"conditioner max abs diff {d_cond:.3g}")
  assert d_enc <= TOL and d_cond <= TOL
  assert tokens.shape == (4, 64, 32) and np.array_equal(np.asarray(out_mask), mask)
  assert np.all(tokens[~mask] == 0.0) and np.abs(tokens[mask]).min() > 0


def test_weight_keys_are_all_used(t5_dir):
  path, model = t5_dir
  weights = convert_t5.read_weights(path)
  enc = t5.T5Encoder(convert_t5.load_config(path), nnx.Rngs(1))
  assert convert_t5.load_torch_state_dict(enc, weights) == {"missing": [], "unexpected": []}
  # A full encoder-decoder checkpoint: the decoder half is ignored, by design.
  full = transformers.T5ForConditionalGeneration(model.config)
  sd = {k: v for k, v in full.state_dict().items()}
  assert any(k.startswith("decoder.") for k in sd)
  assert convert_t5.load_torch_state_dict(enc, sd)["unexpected"] == []
  with pytest.raises(ValueError, match="unexpected keys.*encoder.extra"):
    convert_t5.load_torch_state_dict(enc, {**weights, "encoder.extra": np.zeros(2)})
  some = next(k for k in weights if k.endswith("SelfAttention.q.weight"))
  with pytest.raises(ValueError, match="missing keys"):
    convert_t5.load_torch_state_dict(enc, {k: v for k, v in weights.items() if k != some})
  with pytest.raises(ValueError, match="wrongly shaped"):
    convert_t5.load_torch_state_dict(enc, {**weights, some: np.zeros((3, 3))})


def test_pytorch_bin_and_spiece(tmp_path, t5_dir):
  """pytorch_model.bin instead of safetensors; spiece.model instead of tokenizer.json."""
  import sentencepiece
  path, model = t5_dir
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  sentencepiece.SentencePieceTrainer.train(
    sentence_iterator=iter([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]),
    model_prefix=str(tmp_path / "spiece"), vocab_size=40, model_type="unigram", pad_id=0,
    eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
  tok = convert_t5.load_tokenizer(str(tmp_path), 8)
  proc = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "spiece.model"))
  ids, mask = tok(["warm bass", " ".join(WORDS)])
  short = proc.encode("warm bass") + [1]
  assert list(ids[0, :len(short)]) == short and mask[0].sum() == len(short)
  assert not ids[0, len(short):].any()
  assert mask[1].all() and ids[1, -1] == 1 and list(ids[1, :7]) == proc.encode(" ".join(WORDS))[:7]
  cond = convert_t5.load_conditioner(str(tmp_path), max_length=8)
  ids, mask = cond.tokenizer(["warm bass"])
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
  assert float(np.max(np.abs(np.asarray(cond(["warm bass"])[0]) - ref * mask[..., None]))) <= TOL


def test_bad_directory_errors(tmp_path, t5_dir):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    convert_t5.load_conditioner(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="no config.json"):
    convert_t5.load_conditioner(str(tmp_path))
  path, _ = t5_dir
  (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
  with pytest.raises(FileNotFoundError, match="no T5 weights"):
    convert_t5.load_conditioner(str(tmp_path))
  os.link(os.path.join(path, "model.safetensors"), tmp_path / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="no tokenizer"):
    convert_t5.load_conditioner(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match="not a T5"):
    convert_t5.load_config(str(tmp_path))
