"""The three attention layers: the identities DESIGN.md promises, the purity guarantee, and the errors."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import sigma_ref as sr
from sigma_ref import kernels
from sigma_ref.attention import prepare_layout
from conftest import modality_rows

D, H = 32, 4


def make(kind="sigma", seed=0, **overrides):
    torch.manual_seed(seed)
    config = sr.AttentionConfig(hidden_size=overrides.pop("hidden_size", D), num_heads=overrides.pop("num_heads", H),
                                **overrides)
    return sr.make_attention(kind, config)


def inputs(ids, seed=1):
    return torch.randn(ids.shape[0], ids.shape[1], D, generator=torch.Generator().manual_seed(seed))


@given(modality_rows(max_len=40), st.integers(0, H), st.sampled_from(["standard", "gated", "sigma"]))
def test_all_backends_same_output_and_gradients(ids, split, kind):
    x = inputs(ids).requires_grad_()
    results = {}
    for backend in ["math", "sdpa", "packed", "auto"]:
        layer = make(kind, num_intra_heads=split, backend=backend)
        y = layer(x, ids)
        grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
        results[backend] = (y, grads)
    y_ref, grads_ref = results.pop("math")
    for backend, (y, grads) in results.items():
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"{backend}: {m}")
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"{backend} grad: {m}")


@given(modality_rows(max_len=40), st.integers(1, H), st.sampled_from(["math", "packed", "sdpa"]))
def test_purity_text_intra_stream_ignores_image_tokens(ids, split, backend):
    """Perturbing image tokens never moves o_intra of a text token; o_global of later text tokens does move."""
    layer = make(num_intra_heads=split, backend=backend)
    x = inputs(ids)
    image = (ids == sr.IMAGE)[..., None]
    x_perturbed = torch.where(image, x + 3 * torch.randn_like(x), x)
    with torch.no_grad():
        _, d0 = layer(x, ids, return_details=True)
        _, d1 = layer(x_perturbed, ids, return_details=True)
    text = ids == sr.TEXT
    assert torch.equal(d0.o_intra[text], d1.o_intra[text])    # bitwise: the image never enters the computation
    # A text token with an earlier image token has the image in its global stream.
    seen_image = torch.cummax((ids == sr.IMAGE).long(), dim=1).values.bool() & text
    if seen_image.any() and split < H:
        assert (d0.o_global[seen_image] - d1.o_global[seen_image]).abs().max() > 1e-4


def test_purity_example_from_the_design():
    ids = sr.layout("T4 I16 T8")
    layer = make()
    x = inputs(ids[None])
    x2 = x.clone()
    x2[:, 4:20] = torch.randn(16, D)
    _, a = layer(x, ids, return_details=True)
    _, b = layer(x2, ids, return_details=True)
    assert torch.equal(a.o_intra[:, ids == 0], b.o_intra[:, ids == 0])
    assert not torch.allclose(a.o_global[:, 20:], b.o_global[:, 20:])


@given(st.floats(-4, 4), st.floats(-4, 4), st.floats(-4, 4), st.floats(-4, 4), st.integers(0, H))
def test_gate_at_zero_input_is_sigmoid_of_bias(it, ii, gt, gi, split):
    bias = ((it, ii), (gt, gi))
    layer = make(num_intra_heads=split, bias_init=bias)
    ids = sr.layout("T3 I4 T2")
    _, d = layer(torch.zeros(1, len(ids), D), ids, return_details=True)
    for stream, gate in ((0, d.g_intra), (1, d.g_global)):
        width = (layer.config.intra_dim, layer.config.global_dim)[stream]
        if width == 0:
            assert gate is None
            continue
        expected = torch.sigmoid(torch.tensor(bias[stream]))[ids]                  # [S]
        torch.testing.assert_close(gate[0], expected[:, None].expand(-1, width), atol=1.2e-7, rtol=0)  # float32 ulp


@given(modality_rows(max_len=24), st.integers(0, H), st.booleans(), st.booleans())
def test_output_is_o_proj_of_gated_concat(ids, split, gates, bias):
    layer = make(num_intra_heads=split, use_gates=gates, use_stream_bias=bias, backend="math")
    y, d = layer(inputs(ids), ids, return_details=True)
    gi = 1 if d.g_intra is None else d.g_intra
    gg = 1 if d.g_global is None else d.g_global
    torch.testing.assert_close(y, layer.o_proj(torch.cat([gi * d.o_intra, gg * d.o_global], -1)), atol=1e-6, rtol=1e-6)
    assert d.o_intra.shape[-1] == split * D // H and d.o_global.shape[-1] == D - split * D // H
    assert d.attn_probs.shape == (ids.shape[0], H, ids.shape[1], ids.shape[1])
    assert (d.g_intra is None) == (not gates or split == 0)


def test_details_without_math_backend_have_no_probs():
    ids = sr.layout("T2 I2")
    _, d = make(backend="packed")(inputs(ids[None]), ids, return_details=True)
    assert d.attn_probs is None


@given(modality_rows(max_len=32))
def test_sigma_without_gates_and_intra_heads_is_standard_attention(ids):
    standard = make("standard")
    sigma = make("sigma", num_intra_heads=0, use_gates=False)
    sigma.load_state_dict(standard.state_dict())                 # same q/k/v/o weights, nothing else
    x = inputs(ids)
    torch.testing.assert_close(sigma(x, ids), standard(x, ids), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("headwise", [False, True])
def test_gated_with_zero_gate_weights_is_half_of_standard_before_o_proj(headwise):
    ids = sr.layout("T3 I6 T5")[None]
    gated, standard = make("gated", headwise_gate=headwise), make("standard")
    standard.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "gate_proj.weight"})
    torch.nn.init.zeros_(gated.gate_proj.weight)
    x = inputs(ids)
    _, dg = gated(x, ids, return_details=True)
    _, ds = standard(x, ids, return_details=True)
    torch.testing.assert_close(dg.g_global, torch.full_like(dg.g_global, 0.5))
    y_gated = gated(x, ids)
    torch.testing.assert_close(y_gated, standard.o_proj(0.5 * ds.o_global), atol=1e-6, rtol=1e-6)


def test_standard_ignores_modality_ids():
    layer = make("standard")
    x = inputs(torch.zeros(1, 10, dtype=torch.long))
    torch.testing.assert_close(layer(x, sr.layout("T5 I5")), layer(x, sr.layout("I3 T7")))


@given(st.lists(st.integers(1, 20), min_size=2, max_size=4), st.sampled_from(["standard", "gated", "sigma"]),
       st.sampled_from(["math", "sdpa", "packed"]))
def test_right_padding(lengths, kind, backend):
    """Rows of different lengths padded on the right give each row's unpadded result at its real positions."""
    layer = make(kind, backend=backend)
    S = max(lengths)
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 2, (n,), generator=g) for n in lengths]
    xs = [torch.randn(1, n, D, generator=g) for n in lengths]
    ids = torch.stack([torch.cat([r, torch.zeros(S - len(r), dtype=torch.long)]) for r in rows])   # pad = TEXT
    x = torch.cat([torch.cat([xi, torch.randn(1, S - xi.shape[1], D, generator=g)], 1) for xi in xs])
    y = layer(x, ids)
    for b, (row, xi) in enumerate(zip(rows, xs)):
        torch.testing.assert_close(y[b, :len(row)], layer(xi, row)[0], atol=1e-5, rtol=1e-5)


def test_stream_bias_layout_even_and_uneven():
    even = make()
    assert even.stream_bias.shape == (2, 2, D // 2)
    uneven = make(num_intra_heads=1, bias_init=((2.0, 1.0), (-2.0, 0.5)))
    assert uneven.stream_bias.shape == (2, 2, 3 * D // H)
    ids = sr.layout("T2 I1")[None]
    assert uneven.stream_bias_for(0, ids).shape == (1, 3, D // H)
    assert uneven.stream_bias_for(1, ids).shape == (1, 3, 3 * D // H)
    assert uneven.stream_bias_for(0, ids)[0, 2, 0] == 1.0 and uneven.stream_bias_for(1, ids)[0, 0, 0] == -2.0
    assert make(use_stream_bias=False).stream_bias is None


def test_parameter_names_follow_the_seed():
    names = dict(make().named_parameters())
    for name in ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                 "gate_intra_proj.weight", "gate_global_proj.weight", "stream_bias"]:
        assert name in names
    assert names["gate_intra_proj.weight"].shape == (D // 2, D)
    assert not any(n.endswith(".bias") for n in names)       # B is the gates' only bias


def test_default_split_is_half():
    assert sr.AttentionConfig(hidden_size=64, num_heads=8).num_intra_heads == 4


# --- errors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_size=30, num_heads=4), r"hidden_size must be divisible by num_heads, got hidden_size=30 and num_heads=4"),
    (dict(num_intra_heads=5), r"num_intra_heads must be an int in 0..4 \(0..num_heads\), got 5"),
    (dict(num_intra_heads=-1), r"num_intra_heads .* got -1"),
    (dict(bias_init=((1.0, 0.0),)), r"bias_init must have shape \[2, 2\]"),
    (dict(bias_init=((1.0, 0.0, 3.0), (1.0, 0.0))), r"bias_init must have shape \[2, 2\]"),
    (dict(bias_init=1.0), r"bias_init must be nested"),
    (dict(bias_init=(("a", 0.0), (1.0, 0.0))), r"bias_init entry .* must be a finite number, got .a."),
    (dict(backend="triton"), r"backend must be one of .* got 'triton'"),
    (dict(hidden_size=0), r"hidden_size must be an int >= 1, got 0"),
])
def test_config_errors(kwargs, message):
    args = dict(hidden_size=32, num_heads=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sr.AttentionConfig(**args)


@pytest.mark.parametrize("kind", ["standard", "gated", "sigma"])
def test_forward_input_errors(kind):
    layer = make(kind)
    x = torch.randn(2, 5, D)
    with pytest.raises(ValueError, match=r"modality_ids holds the value 2; expected ids in 0..1"):
        layer(x, torch.tensor([0, 1, 2, 0, 0]))
    with pytest.raises(ValueError, match=r"modality_ids must have shape \[seq\] = \[5\] or \[batch, seq\] = \[2, 5\].*got \[4\]"):
        layer(x, sr.layout("T4"))
    with pytest.raises(ValueError, match=r"modality_ids must have shape .* got \[3, 5\]"):
        layer(x, torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \[batch, seq, hidden_size=32\], got \[2, 5, 16\]"):
        layer(torch.randn(2, 5, 16), sr.layout("T5"))
    with pytest.raises(ValueError, match=r"modality_ids must have an integer dtype"):
        layer(x, torch.zeros(5))


def test_flash_backend_on_cpu_fp32_says_what_to_use():
    layer = make(backend="flash")
    with pytest.raises(ValueError, match="backend='flash'.*(not installed|CUDA).*(packed|auto)"):
        layer(torch.randn(1, 4, D), sr.layout("T2 I2"))


def test_unknown_attention_kind():
    with pytest.raises(ValueError, match="attention must be one of"):
        sr.make_attention("linear", sr.AttentionConfig(hidden_size=32, num_heads=4))


@given(modality_rows(max_len=16), st.integers(0, H), st.booleans())
def test_fused_gates_equal_the_per_stream_definition(ids, split, bias):
    layer = make(num_intra_heads=split, use_stream_bias=bias)
    x = inputs(ids)
    parts = [g for g in (layer.gate(0, x, ids), layer.gate(1, x, ids)) if g is not None]
    torch.testing.assert_close(layer.gates(x, ids), torch.cat(parts, -1), atol=1e-6, rtol=1e-6)


@given(modality_rows(max_len=24), st.integers(0, H), st.booleans(), st.booleans(), st.sampled_from(["gated", "sigma"]))
def test_gated_output_projection_is_autograd_to_the_bit(ids, split, gates, bias, kind):
    """The forward pass without details runs GatedOutputProjection (the gate recomputed in the backward pass);
    autograd's composition of the same ops gives the same values and gradients to the bit. (backend "sdpa":
    on "packed" the whole layer is one Function instead, tested below.) The step-by-step forward, which
    computes each stream's gate with its own matmul, agrees to rounding."""
    overrides = dict(num_intra_heads=split, use_gates=gates, use_stream_bias=bias) if kind == "sigma" else {}
    layer = make(kind, backend="sdpa", **overrides)
    if kind == "sigma" and layer.stream_bias is not None:
        with torch.no_grad():
            layer.stream_bias.normal_(generator=torch.Generator().manual_seed(2))
    x = inputs(ids).requires_grad_()
    y = layer(x, ids)
    w, layout = layer.weights(), prepare_layout(ids, x)
    o, _ = layer.attend(x, layout)
    gated = o if w.gate is None else o * torch.sigmoid(kernels.gate_logits(x, w.gate, w.table, layout.ids))
    y_autograd = F.linear(gated, w.o)
    grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
    grads_autograd = torch.autograd.grad(y_autograd.square().sum(), [x, *layer.parameters()])
    assert torch.equal(y, y_autograd)
    assert all(torch.equal(g, g_autograd) for g, g_autograd in zip(grads, grads_autograd))
    y_steps = layer(x, ids, return_details=True)[0]
    grads_steps = torch.autograd.grad(y_steps.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(y_steps, y, atol=1e-6, rtol=1e-6)
    for g, g_steps in zip(grads, grads_steps):
        torch.testing.assert_close(g_steps, g, atol=1e-6, rtol=1e-6)


@given(modality_rows(max_len=24), st.integers(1, 24), st.integers(1, 24), st.booleans())
def test_gated_product_is_autograd_to_the_bit_and_keeps_no_gate(ids, width, gate_width, bias):
    """kernels.gated_product (what a layer converted by sigma_ref.hf runs: its o_proj is transformers') equals
    autograd's composition o * sigmoid(x W^T + T[ids]) in values and gradients to the bit, and keeps for the
    backward pass only its inputs: no sigmoid output, no gate."""
    g = torch.Generator().manual_seed(ids.numel() + width)
    x = torch.randn(*ids.shape, width, generator=g, requires_grad=True)
    o = torch.randn(*ids.shape, gate_width, generator=g, requires_grad=True)
    weight = torch.randn(gate_width, width, generator=g, requires_grad=True)
    table = torch.randn(sr.NUM_MODALITIES, gate_width, generator=g, requires_grad=True) if bias else None
    params = [t for t in (x, o, weight, table) if t is not None]
    kept = set()

    def pack(tensor):
        kept.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = kernels.gated_product(x, o, weight, table, ids)
    assert kept <= {t.untyped_storage().data_ptr() for t in (*params, ids)}
    y_autograd = o * torch.sigmoid(kernels.gate_logits(x, weight, table, ids))
    weight_out = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad((y * weight_out).sum(), params)
    grads_autograd = torch.autograd.grad((y_autograd * weight_out).sum(), params)
    assert torch.equal(y, y_autograd)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_autograd))


@given(modality_rows(max_len=40), st.integers(0, H), st.booleans(), st.sampled_from(["gated", "sigma"]), st.data())
def test_whole_gated_layer_on_the_packed_path_equals_the_composition(ids, split, bias, kind, data):
    """On the CPU packed path a gated layer runs as ONE Function (kernels.GatedPackedLayer); with details it
    runs as the composition of the kernel, the gate and o_proj under autograd. Same values and gradients, for
    every split, with and without the stream bias, with right padding and any number of threads (the backward
    folds head chunks whose size follows the threads)."""
    overrides = dict(num_intra_heads=split, use_stream_bias=bias) if kind == "sigma" else {}
    layer = make(kind, backend="packed", **overrides)
    if kind == "sigma" and layer.stream_bias is not None:
        with torch.no_grad():
            layer.stream_bias.normal_(generator=torch.Generator().manual_seed(2))
    batch, seq_len = ids.shape
    lengths = data.draw(st.lists(st.integers(0, seq_len), min_size=batch, max_size=batch), label="lengths")
    valid = torch.arange(seq_len)[None] < torch.tensor(lengths)[:, None]
    x = inputs(ids).requires_grad_()
    with sr.runtime.torch_threads(data.draw(st.integers(1, 3), label="threads")):
        y = layer(x, ids, valid=valid)
        assert type(y.grad_fn).__name__ == "GatedPackedLayerBackward"      # the whole-layer path did run
        y_composed = layer(x, ids, return_details=True, valid=valid)[0]
        grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
        grads_composed = torch.autograd.grad(y_composed.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(y, y_composed, atol=1e-6, rtol=1e-6)
    assert (y[~valid] == 0).all()
    for g, g_composed in zip(grads, grads_composed):
        torch.testing.assert_close(g, g_composed, atol=1e-5, rtol=1e-5)


def test_whole_gated_layer_only_where_its_kernel_runs():
    """Elsewhere the layers compose as before: the sdpa backend, decoding with a cache, autocast, no gates."""
    ids = sr.layout("T3 I5 T4")
    x = inputs(ids[None])
    assert grad_fn_name(make("sigma", backend="sdpa")(x, ids)) == "GatedOutputProjectionBackward"
    assert grad_fn_name(make("sigma", backend="packed", use_gates=False)(x, ids)) != "GatedPackedLayerBackward"
    assert grad_fn_name(make("sigma", backend="packed")(x, ids, cache=sr.attention.KVCache())) == \
        "GatedOutputProjectionBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert grad_fn_name(make("gated", backend="packed")(x, ids)) != "GatedPackedLayerBackward"


def grad_fn_name(y) -> str:
    return type(y.grad_fn).__name__


def saved_activation_bytes(layer, x, ids) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of layer(x, ids), beyond x and the weights."""
    skip = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    kept = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in skip:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x, ids)
    return sum(kept.values())


@pytest.mark.parametrize("seq_len", [512, 2048])
def test_gates_keep_no_extra_activations_for_the_backward_pass(seq_len):
    """A gate costs no [B, S, D] activation of its own: beyond what standard attention keeps for the backward
    pass, Gated and SIGMA keep less than a quarter of one activation (SIGMA's packed kernel: log-sum-exps and
    index grids), plus, for SIGMA, its two gate weights stacked into one [D, D] matrix. Stored by autograd,
    the gate and the gated product would be two activations more."""
    width = 256
    ids = torch.zeros(1, seq_len, dtype=torch.long)
    ids[0, seq_len // 4: 3 * seq_len // 4] = sr.IMAGE
    x = torch.randn(1, seq_len, width, requires_grad=True)
    kept = {kind: saved_activation_bytes(make(kind, hidden_size=width, num_heads=8), x, ids)
            for kind in ("standard", "gated", "sigma")}
    activation, stacked_gate_weight = x.numel() * 4, width * width * 4
    assert kept["gated"] - kept["standard"] < activation / 4, kept
    assert kept["sigma"] - kept["standard"] - stacked_gate_weight < activation / 4, kept
