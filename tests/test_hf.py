"""sigma_ref.hf: SIGMA inside Hugging Face models, on tiny random configs built here (nothing downloaded)."""

import copy
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,  # noqa: E402
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from sigma_ref import data as D, kernels  # noqa: E402
from sigma_ref.hf import from_pretrained, sigmafy, toy  # noqa: E402
from sigma_ref.testing.hf import hf_flash_double  # noqa: E402

from conftest import modality_rows  # noqa: E402

VOCAB, IMAGE_ID = 40, 7
DECODERS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "qwen3": (Qwen3Config, Qwen3ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}


def tiny_decoder(kind="llama", attn="sdpa", kv_heads=2, seed=0, **options):
    config_class, model_class = DECODERS[kind]
    config = config_class(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                          attn_implementation=attn, **options)
    torch.manual_seed(seed)
    return model_class(config).eval()


def randomize_gates(model, seed=1):
    """Gates start at sigmoid(B) (zero weights); random ones make every test below depend on them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".sigma." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model


def right_padded(batch=2, length=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, VOCAB, (batch, length), generator=generator)
    ids[:, 2:6] = IMAGE_ID
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -3:] = 0                                                    # the first row is right-padded
    return ids, mask


def llava_batch(n=3):
    samples = toy.ToyCaptions("test")
    return toy.collate([samples[i] for i in range(n)])


# ---------------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", list(DECODERS))
def test_disabled_conversion_is_the_original_model(kind, attn):
    original = tiny_decoder(kind, attn)
    converted = sigmafy(copy.deepcopy(original), num_intra_heads=0, use_gates=False)
    ids, mask = right_padded()
    assert torch.equal(converted(ids, attention_mask=mask).logits, original(ids, attention_mask=mask).logits)


def test_disabled_conversion_of_llava_is_the_original_model():
    original = toy.tiny_llava().eval()
    converted = sigmafy(copy.deepcopy(original), num_intra_heads=0, use_gates=False)
    batch = llava_batch()
    assert torch.equal(converted(**batch).logits, original(**batch).logits)


def stream_inputs(model, ids, modality_ids):
    """o_proj's input at every layer [B, S, H * d] (intra channels first), recorded by forward pre-hooks."""
    seen = []
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
             for layer in model.model.layers]
    try:
        logits = model(ids, modality_ids=modality_ids).logits
    finally:
        for hook in hooks:
            hook.remove()
    return logits, seen


@settings(max_examples=15)
@given(layout=modality_rows(max_batch=2, max_len=14), seed=st.integers(0, 2 ** 16))
def test_text_tokens_intra_stream_ignores_every_image_token(layout, seed):
    """Change every image token: the text tokens' intra stream does not move (at the first layer, whose input
    is the token itself); with every head intra, nothing about a text token moves, logits included."""
    batch, length = layout.shape
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    other = torch.where(layout.bool(), torch.randint(0, VOCAB, (batch, length), generator=generator), ids)
    text = ~layout.bool()
    split = randomize_gates(sigmafy(tiny_decoder(), num_intra_heads=2))
    _, before = stream_inputs(split, ids, layout)
    _, after = stream_inputs(split, other, layout)
    intra = slice(0, 2 * 16)                                           # two intra heads of 16 channels
    torch.testing.assert_close(after[0][..., intra][text], before[0][..., intra][text], rtol=0, atol=1e-6)
    sees_a_change = text & ((ids != other).cumsum(1) > 0)              # text after a changed image token
    if sees_a_change.any():                                            # ... whose global stream does see it
        assert not torch.allclose(after[0][..., 32:][sees_a_change], before[0][..., 32:][sees_a_change], atol=1e-6)
    pure = randomize_gates(sigmafy(tiny_decoder(), num_intra_heads=4))
    logits_before, _ = stream_inputs(pure, ids, layout)
    logits_after, _ = stream_inputs(pure, other, layout)
    torch.testing.assert_close(logits_after[text], logits_before[text], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind, options", [("qwen2", {}), ("qwen3", {}), ("mistral", {"sliding_window": 5})])
def test_every_supported_decoder_keeps_text_pure(kind, options):
    """Qwen2 (biased projections), Qwen3 (q/k norms) and Mistral (a sliding window, which the intra mask
    keeps): all-intra text logits ignore the image tokens, and the window still limits what a token sees."""
    ids, _ = right_padded(batch=2, length=12)
    layout = (ids == IMAGE_ID).long()
    other = torch.where(layout.bool(), torch.randint(8, VOCAB, ids.shape), ids)
    model = randomize_gates(sigmafy(tiny_decoder(kind, **options), num_intra_heads=4, image_token_id=None))
    text = ~layout.bool()
    torch.testing.assert_close(model(other, modality_ids=layout).logits[text], model(ids, modality_ids=layout).logits[text],
                               rtol=0, atol=1e-5)
    if options:                        # a text token 6 or more places back is outside the window of 5
        far = ids.clone()
        far[:, 0] = (far[:, 0] + 1) % VOCAB
        assert torch.equal(model(far, modality_ids=layout).logits[:, 11], model(ids, modality_ids=layout).logits[:, 11])


def test_llava_text_logits_ignore_the_image_when_every_head_is_intra():
    model = randomize_gates(sigmafy(toy.tiny_llava(), num_intra_heads=4)).eval()
    batch = llava_batch()
    other = dict(batch, pixel_values=torch.rand_like(batch["pixel_values"]))
    text = batch["input_ids"] != D.IMAGE_TOKEN
    split = randomize_gates(sigmafy(toy.tiny_llava(), num_intra_heads=2)).eval()
    torch.testing.assert_close(model(**other).logits[text], model(**batch).logits[text], rtol=0, atol=1e-5)
    assert not torch.allclose(split(**other).logits[text], split(**batch).logits[text], atol=1e-3)


@pytest.mark.parametrize("route", ["image_token_id", "modality_ids"])
def test_cached_generation_equals_uncached(route):
    model = randomize_gates(sigmafy(tiny_decoder(), image_token_id=IMAGE_ID if route == "image_token_id" else None))
    ids, _ = right_padded(batch=2, length=9)
    extra = {} if route == "image_token_id" else {"modality_ids": (ids == IMAGE_ID).long()}
    common = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0, **extra)
    cached = model.generate(ids, use_cache=True, **common)
    uncached = model.generate(ids, use_cache=False, **common)
    assert torch.equal(cached, uncached)
    # Step by step with the cache, the logits equal one forward over the whole sequence.
    whole = model(cached, modality_ids=(cached == IMAGE_ID).long()).logits
    out = model(cached[:, :9], modality_ids=(cached[:, :9] == IMAGE_ID).long(), use_cache=True)
    steps = [out.logits]
    for i in range(9, cached.shape[1]):
        out = model(cached[:, i:i + 1], modality_ids=(cached[:, :i + 1] == IMAGE_ID).long(),
                    past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=0, atol=1e-5)


def test_llava_cached_generation_equals_uncached():
    model = randomize_gates(sigmafy(toy.tiny_llava())).eval()
    batch = llava_batch()
    prompt = batch["input_ids"][:, :len(toy.PROMPT)]
    common = dict(input_ids=prompt, pixel_values=batch["pixel_values"], attention_mask=torch.ones_like(prompt),
                  max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(use_cache=True, **common), model.generate(use_cache=False, **common))


@torch.no_grad()                        # FlexAttention has no backward on CPU
def test_fp32_kernels_agree_and_bf16_autocast_runs():
    ids, mask = right_padded()
    outputs = {}
    for attn in ("eager", "sdpa", "flex_attention"):
        model = randomize_gates(sigmafy(tiny_decoder(attn=attn), image_token_id=IMAGE_ID))
        outputs[attn] = model(ids, attention_mask=mask).logits
    real = mask.bool()
    for attn in ("sdpa", "flex_attention"):
        torch.testing.assert_close(outputs[attn][real], outputs["eager"][real], rtol=0, atol=1e-5)
    model = randomize_gates(sigmafy(tiny_decoder(), image_token_id=IMAGE_ID))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids, attention_mask=mask).logits
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    torch.testing.assert_close(low.float()[real], outputs["sdpa"][real], rtol=0, atol=0.1)


@pytest.mark.parametrize("split_from", [kernels.packed.SPLIT_FROM, 1],
                         ids=["grids as split in use", "a grid per length"])
@settings(max_examples=10)
@given(layout=modality_rows(max_batch=3, max_len=16), lengths=st.lists(st.integers(1, 16), min_size=3, max_size=3))
def test_the_packed_intra_stream_equals_the_masked_one(split_from, layout, lengths):
    """With sdpa and no cache, the intra stream runs sigma_ref's packed kernel (no [S, S] mask); eager always
    uses the mask. Values and gradients agree on random layouts with right padding, with the segments in one
    grid (as at these lengths) and split into grids as long sequences split them."""
    batch, length = layout.shape
    mask = (torch.arange(length)[None] < torch.tensor(lengths[:batch]).clamp(max=length)[:, None]).long()
    ids = torch.randint(8, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length))
    results = []
    for attn in ("sdpa", "eager"):
        model = randomize_gates(sigmafy(tiny_decoder(attn=attn), num_intra_heads=2)).train()
        with mock.patch.object(kernels.packed, "SPLIT_FROM", split_from):
            logits = model(ids, attention_mask=mask, modality_ids=layout).logits
        (logits * mask[..., None]).sum().backward()
        results.append((logits[mask.bool()], {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (packed, packed_grads), (masked, masked_grads) = results
    torch.testing.assert_close(packed, masked, rtol=0, atol=1e-5)
    for name, grad in masked_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_packing_applies_only_where_it_is_exact():
    from sigma_ref.hf import convert

    model = sigmafy(tiny_decoder(attn="sdpa"), image_token_id=IMAGE_ID)
    config = model.model.config
    every = torch.zeros(2, 6, dtype=torch.long)
    right = torch.tensor([[1, 1, 1, 1, 1, 0], [1] * 6])
    assert convert._packed_layout(config, every, 0, right, None) is not None
    assert convert._packed_layout(config, every, 0, None, None) is not None
    assert convert._packed_layout(config, every, 0, right.flip(1), None) is None          # left padding
    assert convert._packed_layout(config, every, 3, right, None) is None                  # a cache
    assert convert._packed_layout(config, every, 0, None, torch.arange(6)[None]) is None  # packed sequences
    model.set_attn_implementation("eager")
    assert convert._packed_layout(config, every, 0, right, None) is None


def test_switching_the_models_kernel_keeps_sigma():
    model = randomize_gates(sigmafy(tiny_decoder(attn="sdpa"), image_token_id=IMAGE_ID))
    ids, mask = right_padded()
    sdpa = model(ids, attention_mask=mask).logits
    model.set_attn_implementation("eager")
    assert model.model.layers[0].self_attn.config._attn_implementation == "sigma_ref"
    torch.testing.assert_close(model(ids, attention_mask=mask).logits[mask.bool()], sdpa[mask.bool()],
                               rtol=0, atol=1e-5)


def test_gradients_reach_the_gates_and_the_stream_bias():
    model = sigmafy(toy.tiny_llava())
    model(**llava_batch()).loss.backward()
    attn = model.model.language_model.layers[0].self_attn
    for p in (attn.sigma.gate_intra_proj.weight, attn.sigma.gate_global_proj.weight, attn.sigma.stream_bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# Flash-attention kernels: transformers' own flash code, with flash_double as the kernel (bf16, as flash needs)
# ---------------------------------------------------------------------------------------------------

def flash_and_sdpa(model, *args, config=None, **kwargs):
    """The model's output through the flash route (the double's kernel) and through sdpa, same weights."""
    with hf_flash_double(config or model.config) as double:
        double.calls.clear()
        flash = model(*args, **kwargs)
        calls = list(double.calls)
    return flash, model(*args, **kwargs), calls


def relative_error(a, b, floor=1e-5):
    """|a - b| / |b|, with `floor` under |b|: a gradient that is zero in theory (one token's query) reads as
    round-off in one route and exactly 0 in the other."""
    return float((a.float() - b.float()).norm() / (b.float().norm() + floor))


@settings(max_examples=12, deadline=None)
@given(layout=modality_rows(max_batch=3, max_len=14), lengths=st.lists(st.integers(1, 14), min_size=3, max_size=3),
       left=st.booleans(), intra=st.sampled_from([2, 4]))
def test_the_flash_route_equals_the_masked_one(layout, lengths, left, intra):
    """Random layouts, left or right padding, split or all-intra: logits and gradients through transformers'
    flash code (the intra stream as packed varlen segments) agree with sdpa's masks, to bf16's precision."""
    batch, length = layout.shape
    mask = (torch.arange(length)[None] < torch.tensor(lengths[:batch]).clamp(max=length)[:, None]).long()
    if left:
        mask = mask.flip(1)
    ids = torch.randint(8, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length))
    model = randomize_gates(sigmafy(tiny_decoder(), num_intra_heads=intra)).to(torch.bfloat16).train()
    grads = []
    for route in ("flash", "sdpa"):
        model.zero_grad()
        if route == "flash":
            with hf_flash_double(model.config) as double:
                double.calls.clear()
                logits = model(ids, attention_mask=mask, modality_ids=layout).logits
                (logits.float() * mask[..., None]).sum().backward()
                assert "flash_attn_varlen_func" in double.calls          # the intra stream went to the kernel
            flash_logits = logits
        else:
            logits = model(ids, attention_mask=mask, modality_ids=layout).logits
            (logits.float() * mask[..., None]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    real = mask.bool()
    torch.testing.assert_close(flash_logits.float()[real], logits.float()[real], rtol=0, atol=0.03)
    for name, grad in grads[1].items():
        assert relative_error(grads[0][name], grad) < 0.05, name


def test_the_flash_route_keeps_text_pure_to_the_bit():
    """Every head intra: a text token's segments hold no image token, so its logits do not move at all when
    every image token changes (a segment that mixed modalities would move them)."""
    ids, mask = right_padded(batch=2, length=12)
    layout = (ids == IMAGE_ID).long()
    other = torch.where(layout.bool(), torch.randint(8, VOCAB, ids.shape), ids)
    model = randomize_gates(sigmafy(tiny_decoder(), num_intra_heads=4)).to(torch.bfloat16)
    with hf_flash_double(model.config):
        before = model(ids, attention_mask=mask, modality_ids=layout).logits
        after = model(other, attention_mask=mask, modality_ids=layout).logits
    text = ~layout.bool() & mask.bool()
    assert torch.equal(after[text], before[text])
    split = randomize_gates(sigmafy(tiny_decoder(), num_intra_heads=2)).to(torch.bfloat16)
    with hf_flash_double(split.config):
        moved = split(other, attention_mask=mask, modality_ids=layout).logits
        still = split(ids, attention_mask=mask, modality_ids=layout).logits
    assert not torch.equal(moved[text], still[text])                    # the global stream does see the image


def test_flash_cached_generation_equals_uncached_with_left_padding():
    """generate() with transformers' cache through flash: each step's intra segment holds the new token's
    modality's cached keys and the new query last (flash-attn's bottom-right causal mask)."""
    model = randomize_gates(sigmafy(tiny_decoder(), image_token_id=IMAGE_ID)).to(torch.bfloat16)
    ids, _ = right_padded(batch=2, length=9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                                     # the second row is left-padded
    common = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with hf_flash_double(model.config) as double:
        cached = model.generate(ids, use_cache=True, **common)
        assert "flash_attn_varlen_func" in double.calls
        uncached = model.generate(ids, use_cache=False, **common)
        whole_mask = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)
        whole = model(cached, attention_mask=whole_mask).logits
        out = model(cached[:, :9], attention_mask=mask, use_cache=True)
        steps = [out.logits]
        for i in range(9, cached.shape[1]):
            out = model(cached[:, i:i + 1], attention_mask=whole_mask[:, :i + 1], past_key_values=out.past_key_values,
                        use_cache=True, modality_ids=(cached[:, :i + 1] == IMAGE_ID).long())
            steps.append(out.logits)
    assert torch.equal(cached, uncached)
    real = whole_mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], whole[real], rtol=0, atol=0.03)


def test_flash_packed_documents_stay_apart():
    """Padding-free training packs sequences into one row (position ids restart at 0, no attention mask): the
    intra stream's segments end where each document ends, as transformers' flash code ends the global stream's."""
    model = randomize_gates(sigmafy(tiny_decoder(), image_token_id=IMAGE_ID)).to(torch.bfloat16)
    first, second = right_padded(batch=2, length=8)[0]
    row = torch.cat([first, second])[None]                              # [1, 16]: two documents
    positions = torch.cat([torch.arange(8), torch.arange(8)])[None]
    with hf_flash_double(model.config):
        packed = model(row, position_ids=positions).logits
        alone = model(second[None]).logits
        as_one = model(row).logits                                      # the same row read as one sequence
    torch.testing.assert_close(packed[:, 8:], alone, rtol=0, atol=0.03)
    assert (as_one[:, 8:].float() - alone.float()).abs().max() > 0.1  # what the check above tells apart
    # The boundaries as the flattening collator can also pass them: cumulative lengths, no position ids
    # (rotary positions then run on, which moves no score: they are relative).
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    with hf_flash_double(model.config):
        by_lengths = model(row, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=8, max_length_k=8).logits
    torch.testing.assert_close(by_lengths[:, 8:], alone, rtol=0, atol=0.03)


def test_llava_through_flash_equals_sdpa():
    model = randomize_gates(sigmafy(toy.tiny_llava())).to(torch.bfloat16).eval()
    batch = llava_batch()
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    flash, sdpa, calls = flash_and_sdpa(model, config=model.config.text_config, **batch)
    assert "flash_attn_varlen_func" in calls
    real = batch["attention_mask"].bool()                              # padding: 0 through flash, not through sdpa
    torch.testing.assert_close(flash.logits.float()[real], sdpa.logits.float()[real], rtol=0, atol=0.03)


def test_flash_runs_a_sliding_window_model_within_its_window_and_refuses_beyond():
    """Within the window (Mistral's default is 4096) the window changes nothing and the flash route equals
    sdpa's; a sequence longer than the window needs the window inside the intra mask: a named refusal."""
    ids, mask = right_padded(batch=4)          # 12 tokens a row, 45 packed: more than the window, which must not
    model = randomize_gates(sigmafy(tiny_decoder("mistral", sliding_window=32), image_token_id=IMAGE_ID))
    flash, sdpa, calls = flash_and_sdpa(model.to(torch.bfloat16), ids, attention_mask=mask)
    assert "flash_attn_varlen_func" in calls
    real = mask.bool()
    torch.testing.assert_close(flash.logits.float()[real], sdpa.logits.float()[real], rtol=0, atol=0.03)
    model = sigmafy(tiny_decoder("mistral", sliding_window=5), num_intra_heads=2, image_token_id=IMAGE_ID)
    ids, mask = right_padded()
    with hf_flash_double(model.config), pytest.raises(ValueError, match="got 12 tokens for a window of 5"):
        model.to(torch.bfloat16)(ids, attention_mask=mask)


def test_flash_refuses_what_it_cannot_express():
    ids, mask = right_padded()
    model = sigmafy(tiny_decoder(), image_token_id=IMAGE_ID).to(torch.bfloat16)
    with hf_flash_double(model.config), pytest.raises(ValueError, match=r"attention_mask must be a \[batch, seq\]"):
        model(ids, attention_mask=torch.ones(2, 1, 12, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="implementation must name a flash-attention kernel"):
        with hf_flash_double(model.config, "sdpa"):
            pass


# ---------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------

def test_save_and_load_round_trip(tmp_path):
    model = randomize_gates(sigmafy(tiny_decoder(), num_intra_heads=2, image_token_id=IMAGE_ID,
                                    bias_init=((2.0, 0.5), (-1.0, 0.0))))
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(LlamaForCausalLM, tmp_path).eval()
    assert loaded.config.sigma == model.config.sigma
    assert loaded.config.sigma["num_intra_heads"] == 2 and loaded.config.sigma["image_token_id"] == IMAGE_ID
    ids, mask = right_padded()
    assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_llava_save_and_load_round_trip(tmp_path):
    model = randomize_gates(sigmafy(toy.tiny_llava())).eval()
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(transformers.LlavaForConditionalGeneration, tmp_path).eval()
    batch = llava_batch()
    assert torch.equal(loaded(**batch).logits, model(**batch).logits)


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------

def test_bad_input_is_named():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match=r"model must be one of .*got GPT2LMHeadModel"):
        sigmafy(gpt2)
    for heads, pattern in ((5, r"num_intra_heads must be an int in 0\.\.4"), (-1, "num_intra_heads"),
                           (1, r"num_intra_heads must be a multiple of .* = 2.*got 1")):
        with pytest.raises(ValueError, match=pattern):
            sigmafy(tiny_decoder(), num_intra_heads=heads)
    with pytest.raises(ValueError, match="image_token_id must be an int in 0..39"):
        sigmafy(tiny_decoder(), image_token_id=VOCAB)
    model = sigmafy(tiny_decoder())
    ids, _ = right_padded()
    with pytest.raises(ValueError, match="modality_ids is missing"):
        model(ids)
    for shape in ((2, 13), (3, 12)):
        with pytest.raises(ValueError, match=rf"modality_ids must have shape \[batch, seq\] = \[2, 12\].*got \[{shape[0]}, {shape[1]}\]"):
            model(ids, modality_ids=torch.zeros(shape, dtype=torch.long))
    with pytest.raises(ValueError, match="modality_ids"):
        model(ids, modality_ids=torch.full((2, 12), 3))
    with pytest.raises(ValueError, match="already converted"):
        sigmafy(model)
    with pytest.raises(ValueError, match="not converted"):
        tiny_decoder().save_pretrained("/tmp/sigma_ref_plain") or from_pretrained(LlamaForCausalLM, "/tmp/sigma_ref_plain")
    # Nothing depends on the modality without intra heads or stream bias: then no ids are needed.
    plain = sigmafy(tiny_decoder(), num_intra_heads=0, use_stream_bias=False)
    assert plain(ids).logits.shape == (2, 12, VOCAB)


# ---------------------------------------------------------------------------------------------------
# Training with the ecosystem's tools
# ---------------------------------------------------------------------------------------------------

def test_torchrun_with_two_processes_matches_one(tmp_path):
    """The same global batch of 8 on one process or split 4 + 4 over two (DDP, gloo): the same losses and the
    same weights, up to the order of floating-point sums."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    common = ["-m", "sigma_ref.hf.finetune", "--attention", "sigma", "--steps", "6", "--batch-size", "8", "--save"]
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *common,
                    "--out", str(tmp_path / "two")], check=True, env=env, capture_output=True)
    one, two = (json.loads((tmp_path / run / "log.json").read_text()) for run in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    losses = [[row["loss"] for row in run["log"]] for run in (one, two)]
    assert len(losses[0]) == 6 and losses[0][-1] < losses[0][0]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=0, atol=1e-5)
    weights = [load_file(tmp_path / run / "model.safetensors") for run in ("one", "two")]
    assert weights[0].keys() == weights[1].keys() and any(".sigma." in k for k in weights[0])
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=0, atol=1e-4)


def test_fine_tuning_on_a_cpu_trains_with_one_thread(tmp_path):
    """The package's thread policy (runtime.py) holds inside Trainer too: torch's default threads collapse when
    another program holds a core. The caller's thread count is back afterwards."""
    from sigma_ref.hf import finetune
    from sigma_ref.runtime import TRAINING_THREADS, torch_threads

    seen = []
    with torch_threads(2), mock.patch.object(transformers.Trainer, "train",
                                             lambda self: seen.append(torch.get_num_threads())):
        finetune.finetune(finetune.build("sigma"), tmp_path, steps=1, batch_size=2, train_size=4)
        after = torch.get_num_threads()
    assert seen == [TRAINING_THREADS] and after == 2


def test_the_benchmark_measures_both_models_side_by_side():
    """hf.bench at a short length: both models timed side by side, the ratio of what was measured (no timing is
    asserted: a shared machine makes any timing lie). Its memory measure runs in fresh processes; the committed
    run (results/hf/bench_cpu.json) exercises it."""
    from sigma_ref.hf import bench

    batch = bench.long_batch(130)
    assert batch["input_ids"].shape == (1, 130) and batch["pixel_values"].shape[0] == 2
    assert int((batch["input_ids"] == D.IMAGE_TOKEN).sum()) == 2 * D.NUM_PATCHES
    times = bench.time_pair(130, repeats=1, device="cpu")
    assert set(times["median_seconds"]) == {"original", "sigma"}
    assert times["time_ratio"] == times["median_seconds"]["sigma"] / times["median_seconds"]["original"]
    with pytest.raises(ValueError, match="length must be an int >= 64"):
        bench.long_batch(10)
