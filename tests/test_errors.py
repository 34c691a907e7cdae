"""The "ValueError naming the argument" promise: bad input says which argument, what it saw, what it wanted."""

import pytest
import torch

import sigma_ref as sr
from sigma_ref import data as D
from sigma_ref.attention import KVCache
from sigma_ref.model import ModelConfig, TinyMLLM

from conftest import tiny_model


# --- the "ValueError naming the argument" promise -------------------------------------------------------------

def test_x_of_another_dtype_than_the_module():
    layer = sr.SigmaAttention(sr.AttentionConfig(hidden_size=16, num_heads=2))
    with pytest.raises(ValueError, match="x has dtype torch.float64 but the module's parameters are torch.float32"):
        layer(torch.randn(1, 3, 16, dtype=torch.float64), sr.layout("T3"))


def test_kv_cache_of_another_batch():
    layer = sr.SigmaAttention(sr.AttentionConfig(hidden_size=16, num_heads=2)).eval()
    cache = KVCache()
    layer(torch.randn(2, 3, 16), sr.layout("T3"), cache=cache)
    with pytest.raises(ValueError, match="cache holds a batch of 2 rows but this call has 3"):
        layer(torch.randn(3, 1, 16), sr.layout("T1"), cache=cache)


@pytest.mark.parametrize("value", [2.5, -3, "4", True])
def test_generate_max_new_tokens_must_be_a_non_negative_int(value):
    batch = D.collate([D.encode(D.load_split("test")[0])])
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        tiny_model().generate(batch, max_new_tokens=value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bias_init_must_be_finite(bad):
    with pytest.raises(ValueError, match="bias_init entry .* must be a finite number"):
        sr.AttentionConfig(bias_init=((1.0, bad), (-1.0, 0.0)))


def test_model_config_needs_the_tokenizer_facts():
    with pytest.raises(ValueError, match="vocab_size must be an int >= 1 from your tokenizer"):
        ModelConfig(attention="sigma")
    config = ModelConfig(vocab_size=100, pad_id=0, eos_id=1, answer_id=2)    # any vocabulary, not the toy one
    assert TinyMLLM(config).lm_head.out_features == 100


@pytest.mark.parametrize("read", [sr.evaluate.evaluate, sr.evaluate.exact_match])
def test_evaluating_no_scenes_says_so(read):
    with pytest.raises(ValueError, match="scenes: expected at least one scene"):
        read(tiny_model(), [])
