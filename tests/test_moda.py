"""MODA in miniature: the worked example, MODA = standard attention at identity init, the causal Gram sum
(and the released form's leak), cached decoding, the pseudo-logit's two forms, padding and bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sigma_ref as sr
from sigma_ref import data, evaluate, moda
from sigma_ref.kernels import KVCache
from sigma_ref.masks import IMAGE, TEXT
from sigma_ref.model import TinyMLLM

from conftest import modality_rows, tiny_config

D, H = 32, 4


def layer(seed=0, **switches):
    torch.manual_seed(seed)
    config = sr.AttentionConfig(hidden_size=D, num_heads=H, backend=switches.pop("backend", "auto"))
    return moda.ModaAttention(config, **switches)


def trained_like(module, seed=1):
    """Move every MODA parameter away from its init, so alignment and pseudo-logit both act."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith(("q_proj", "k_proj", "v_proj", "o_proj")):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def test_the_worked_example():
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])[None, None]           # [1, 1, 3, 2]: text, text, image
    v = torch.tensor([[1.0, 1.0], [0.0, 2.0], [0.0, 0.0]])[None, None]
    ids = torch.tensor([[TEXT, TEXT, IMAGE]])
    gram = moda.gram_matrices(moda.gram_terms(k, v, ids == TEXT), causal=True)[0, 0, 2]
    torch.testing.assert_close(gram, torch.tensor([[1.0, 1.0], [0.0, 2.0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(moda.row_normalised(gram), torch.tensor([[0.7071, 0.7071], [0.0, 1.0]]),
                               atol=1e-4, rtol=0)
    aligner = moda.Aligner(2, "identity")
    with torch.no_grad():
        aligner.r.fill_(1.0)
    aligned = aligner(k, moda.gram_matrices(moda.gram_terms(k, v, ids == TEXT), causal=True))[0, 0]
    torch.testing.assert_close(aligned[2], torch.tensor([3.4243, 5.2243]), atol=1e-4, rtol=0)


@settings(max_examples=40, deadline=None)
@given(modality_rows(max_batch=3, max_len=24), st.booleans(), st.booleans(), st.booleans(), st.data())
def test_the_run_by_run_directions_are_the_per_token_definition(ids, causal, released, cached, data):
    """The layer computes one Gram matrix per run of same-modality tokens, for both directions at once; the
    definition builds one per token and direction. The same aligned keys, with padding, random r and W_f, and
    Gram sums carried from a cache."""
    B, S = ids.shape
    valid = torch.arange(S)[None, :] < torch.tensor([data.draw(st.integers(1, S)) for _ in range(B)])[:, None]
    k, v = torch.randn(B, H, S, 8), torch.randn(B, H, S, 8)
    carried = torch.randn(B, H, 2, 8, 8) if cached else None
    aligner = trained_like(moda.Aligner(8, "released" if released else "identity"))
    a, totals = moda.alignment_directions(k, v, ids, valid, causal, carried, totals=True)
    for source in (TEXT, IMAGE):
        counts = valid & (ids == source)
        terms = moda.gram_terms(k, v, counts)
        definition = aligner(k, moda.gram_matrices(terms, causal, None if carried is None else carried[:, :, source]))
        target = (ids != source)[:, None, :, None].expand_as(k)
        torch.testing.assert_close(aligner.aligned_keys(k, a)[target], definition[target], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(totals[:, :, source], terms.sum(2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("switches", [{}, {"duplex": False}, {"gram": "kv", "causal": False}])
def test_the_layer_aligns_each_modality_with_its_own_aligner(switches):
    """ModaAttention.align against the definition: image keys through image_aligner against the text Gram
    matrix, text keys through text_aligner against the image one (unchanged without duplex)."""
    mine = trained_like(layer(**switches))
    ids = torch.tensor([[TEXT] * 3 + [IMAGE] * 5 + [TEXT] * 4 + [IMAGE] * 2 + [TEXT] * 2] * 2)      # [2, 16]
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, 12:] = False
    q, k, v = mine.heads(torch.randn(2, 16, D))
    x = k if mine.config.moda_gram == "kk" else v
    aligned = mine.align(k, v, ids, valid)
    for target, source, aligner in ((IMAGE, TEXT, mine.image_aligner), (TEXT, IMAGE, mine.text_aligner)):
        grams = moda.gram_matrices(moda.gram_terms(k, x, valid & (ids == source)), mine.config.moda_causal)
        expected = k if aligner is None else aligner(k, grams)
        rows = (ids == target)[:, None, :, None].expand_as(k)
        torch.testing.assert_close(aligned[rows], expected[rows], atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(modality_rows(max_batch=2, max_len=24))
def test_at_identity_init_without_the_pseudo_logit_moda_is_standard_attention(ids):
    standard = sr.StandardAttention(sr.AttentionConfig(hidden_size=D, num_heads=H, backend="math"))
    mine = layer(pseudo_logit=False)
    missing, unexpected = mine.load_state_dict(standard.state_dict(), strict=False)
    assert not unexpected and all(name.startswith(("image_aligner", "text_aligner")) for name in missing)
    x = torch.randn(ids.shape[0], ids.shape[1], D)
    # The same function: r = 0 and W_f = I leave every key as it was. Not to the bit: the aligned keys are a
    # fresh contiguous tensor where standard attention's are a transposed view, and the matmul rounds per layout.
    torch.testing.assert_close(mine(x, ids), standard(x, ids), atol=1e-6, rtol=1e-6)


def test_a_base_of_minus_infinity_is_plain_causal_softmax():
    mine = layer()
    with torch.no_grad():
        mine.p_base.fill_(float("-inf"))
    plain = layer(pseudo_logit=False)
    ids, x = sr.layout("T3 I8 T5"), torch.randn(2, 16, D)
    torch.testing.assert_close(mine(x, ids), plain(x, ids), atol=0, rtol=0)


def test_the_pseudo_logit_is_the_explicit_pseudo_columns_summed():
    """StableMask's form: pseudo-scores p_ij = p_base - (j - i - 1) beta in the masked slots of a row of
    `length` columns, one softmax, the masked slots dropped. The module's extra logit gives the same rows."""
    length, S, beta = 12, 7, moda.PSEUDO_BETA
    torch.manual_seed(0)
    scores, base = torch.randn(S, S), torch.randn(S)
    columns = torch.full((S, length), float("-inf"))
    for i in range(S):
        columns[i, :i + 1] = scores[i, :i + 1]
        for j in range(i + 1, length):
            columns[i, j] = base[i] - (j - i - 1) * beta
    explicit = columns.softmax(-1)[:, :S].tril()
    extra = moda.pseudo_logit(torch.arange(S), base[None, None], length=length)[0, 0]     # [S]
    causal = scores.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
    compact = torch.cat([causal, extra[:, None]], -1).softmax(-1)[:, :S]
    torch.testing.assert_close(compact, explicit, atol=1e-6, rtol=1e-6)
    assert math.isinf(moda.pseudo_logit(torch.tensor([length - 1]), torch.zeros(1, 1, 1), length=length).item())


@pytest.mark.parametrize("causal", [True, False])
def test_changing_a_later_token_leaves_earlier_outputs_only_in_the_causal_form(causal):
    """The released form sums the Gram matrix over the whole sequence, so an image key sees text after it."""
    mine = trained_like(layer(causal=causal, duplex=False, gram="kv"))
    ids = sr.layout("T2 I6 T6")
    x = torch.randn(1, 14, D)
    changed = x.clone()
    changed[0, -1] += 3.0                                                       # the last text token
    before, after = mine(x, ids), mine(changed, ids)
    same = torch.allclose(before[0, :-1], after[0, :-1], atol=1e-6)
    assert same == causal


@pytest.mark.parametrize("switches", [{}, {"duplex": False}, {"gram": "kv"}, {"fuser_init": "released"}])
def test_cached_decoding_equals_recomputation(switches):
    mine = trained_like(layer(**switches)).eval()
    ids = torch.tensor([[TEXT] * 3 + [IMAGE] * 6 + [TEXT] * 2 + [IMAGE] + [TEXT] * 3] * 2)   # [2, 15]
    x = torch.randn(2, 15, D)
    full = mine(x, ids)
    cache = KVCache()
    steps = [mine(x[:, :9], ids[:, :9], cache=cache)]                         # the prompt, then one token a step
    for t in range(9, 15):
        steps.append(mine(x[:, t:t + 1], ids[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_cached_tiny_model_generation_equals_recomputation():
    torch.manual_seed(0)
    model = TinyMLLM(tiny_config("moda")).eval()
    trained_like(model.blocks[0].attn)
    scenes = [s for s in data.load_split("test")[:8] if len(s["objects"]) == 2][:3]
    prompts = data.collate([evaluate.prompt_of(data.encode(s)) for s in scenes])
    assert model.generate(prompts, 8, use_cache=True) == model.generate(prompts, 8, use_cache=False)


def test_exact_match_decodes_a_model_that_sees_the_future(monkeypatch):
    """MODA as released (moda_causal=False) sums the Gram matrix over the whole sequence: in a teacher-forced pass
    its image keys carry the caption it is asked to write (a trained one reads 1.0 there and 0.03 decoding). So
    exact_match decodes such a model (evaluate), and refuses batches without their scenes."""
    leaky = TinyMLLM(tiny_config("moda", moda_causal=False)).eval()
    causal = TinyMLLM(tiny_config("moda")).eval()
    assert [b.attn.sees_future for b in leaky.blocks] == [True] * len(leaky.blocks)
    assert not any(b.attn.sees_future for m in (causal, TinyMLLM(tiny_config("moda", moda_causal=False, moda_align=False)),
                                                 TinyMLLM(tiny_config("sigma"))) for b in m.blocks)
    scenes = data.load_split("test")[:4]
    decoded = []
    monkeypatch.setattr(evaluate, "evaluate", lambda model, *args: decoded.append(model) or {"exact_match": 0.25, "loss": 1.5})
    assert evaluate.exact_match(leaky, scenes) == {"exact_match": 0.25, "loss": 1.5} and decoded == [leaky]
    evaluate.exact_match(causal, scenes)
    assert decoded == [leaky]                                      # a causal model is read in one pass
    with pytest.raises(ValueError, match="sees later tokens"):
        evaluate.exact_match(leaky, None, batches=evaluate.teacher_forced_batches(scenes))


@settings(max_examples=20, deadline=None)
@given(modality_rows(max_batch=3, max_len=20), st.data())
def test_right_padding_changes_no_real_output(ids, data):
    mine = trained_like(layer())
    B, S = ids.shape
    lengths = [data.draw(st.integers(1, S)) for _ in range(B)]
    valid = torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]
    x = torch.randn(B, S, D)
    padded = mine(x, ids, valid=valid)
    for row, n in enumerate(lengths):
        alone = mine(x[row:row + 1, :n], ids[row:row + 1, :n])
        torch.testing.assert_close(padded[row, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_aligners_and_the_base():
    mine = layer()
    ids, x = sr.layout("T3 I6 T4 I2"), torch.randn(2, 15, D)
    mine(x, ids).square().sum().backward()
    for name in ("image_aligner.r", "text_aligner.r", "p_base"):
        grad = dict(mine.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_switches_reach_the_layer_from_the_model_config():
    model = TinyMLLM(tiny_config("moda", moda_duplex=False, moda_pseudo_logit=False, moda_gram="kv"))
    attn = model.blocks[0].attn
    assert attn.text_aligner is None and attn.p_base is None and attn.config.moda_gram == "kv"
    assert TinyMLLM(tiny_config("moda", moda_align=False)).blocks[1].attn.image_aligner is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(gram="qq"), r"moda_gram must be one of \('kk', 'kv'\), got 'qq'"),
    (dict(fuser_init="zeros"), r"moda_fuser_init must be one of \('identity', 'released'\), got 'zeros'"),
    (dict(duplex="yes"), r"moda_duplex must be True or False, got 'yes'"),
    (dict(backend="packed"), r"backend must be 'auto' or 'math' for ModaAttention .* got 'packed'"),
])
def test_bad_switches_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        layer(**kwargs)
