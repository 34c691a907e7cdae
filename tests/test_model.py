import copy
import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sigma_ref as sr
from sigma_ref import data as D
from sigma_ref import evaluate as E
from sigma_ref.lab import runs as R
from sigma_ref import train as T
from sigma_ref.model import TinyMLLM

from conftest import tiny_config

TINY = T.TrainConfig(tiny_config(), steps=12, batch_size=8, warmup_steps=3,
                     eval_every=4, eval_samples=8, checkpoint_every=4)


def prompts(n=6, split="test"):
    examples = [E.prompt_of(D.encode(s)) for s in D.load_split(split)[:n]]
    by_len = {}
    for e in examples:
        by_len.setdefault(len(e.tokens), []).append(e)
    return [D.collate(group) for group in by_len.values()]


@pytest.mark.parametrize("attention", ["standard", "gated", "sigma"])
def test_kv_cache_generation_equals_full_recomputation(attention):
    torch.manual_seed(0)
    model = TinyMLLM(tiny_config(attention)).eval()
    for batch in prompts(6) + prompts(6, "text_only"):
        cached = model.generate(batch, max_new_tokens=8, use_cache=True)
        full = model.generate(batch, max_new_tokens=8, use_cache=False)
        assert cached == full


def logits_of_each_step(model, batch, use_cache, steps):
    """The last-position logits of every forward pass generate() makes: what its greedy choice reads."""
    seen, forward = [], model.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.append(out.logits[:, -1])
        return out

    model.forward = spy
    try:
        tokens = model.generate(batch, max_new_tokens=steps, use_cache=use_cache)
    finally:
        del model.forward
    return tokens, torch.stack(seen)


@pytest.mark.parametrize("attention", ["standard", "gated", "sigma"])
def test_a_generated_pad_token_is_a_real_token_cached_or_not(attention):
    """A pad token the model generates is part of the sequence, not right padding.

    The config's pad_id only tells the model which token marks padding, so setting it to a token this model
    generates makes the next steps follow a generated `<pad>`; cached and uncached decoding must agree there.
    """
    fields, batch = D.model_fields(), prompts(1)[0]
    special = {fields["eos_id"], fields["answer_id"]}
    for seed in range(20):                  # a random model that generates an ordinary word early on
        torch.manual_seed(seed)
        model = TinyMLLM(tiny_config(attention)).eval()
        words = [t for t in model.generate(batch, max_new_tokens=4)[0] if t not in special]
        if words:
            break
    model.config.pad_id = words[0]
    cached, cached_logits = logits_of_each_step(model, batch, True, 6)
    full, full_logits = logits_of_each_step(model, batch, False, 6)
    assert words[0] in cached[0] and cached == full
    torch.testing.assert_close(cached_logits, full_logits, atol=1e-5, rtol=1e-5)


def test_cached_logits_equal_full_logits():
    """Stronger than equal argmax: every decoding step's logits match the full forward pass."""
    torch.manual_seed(1)
    model = TinyMLLM(tiny_config("sigma")).eval()
    full = D.collate([D.encode(D.load_split("test")[1])])
    n = full["tokens"].shape[1]
    reference = model({k: v for k, v in full.items() if k != "targets"}).logits
    caches = [sr.attention.KVCache() for _ in model.blocks]
    prefix = 18
    step = {k: v[:, :prefix] for k, v in full.items() if k != "targets"}
    outs = [model(step, caches=caches).logits]
    for i in range(prefix, n):
        outs.append(model({k: v[:, i:i + 1] for k, v in full.items() if k != "targets"}, caches=caches).logits)
    torch.testing.assert_close(torch.cat(outs, 1), reference, atol=1e-5, rtol=1e-5)


def test_decoding_keeps_the_intra_stream_pure():
    """Changing the image does not change the intra-stream output of generated text at layer 0."""
    torch.manual_seed(2)
    model = TinyMLLM(tiny_config("sigma", num_layers=1)).eval()
    batch = D.collate([D.encode(D.load_split("test")[3])])
    other = dict(batch, patches=torch.rand_like(batch["patches"]) * (batch["modality"] == sr.IMAGE)[..., None])
    text = batch["modality"][0] == sr.TEXT
    a = model(batch, return_details=True).details[0]
    b = model(other, return_details=True).details[0]
    assert torch.equal(a.o_intra[0, text], b.o_intra[0, text])
    assert not torch.allclose(a.o_global[0, text][-3:], b.o_global[0, text][-3:])


def test_generate_rejects_prompts_not_ending_in_answer():
    model = TinyMLLM(tiny_config(num_layers=1))
    batch = D.collate([D.encode(D.load_split("test")[0])])
    with pytest.raises(ValueError, match="must end with the answer token"):
        model.generate(batch)


@pytest.mark.parametrize("optimizer", T.OPTIMIZERS)
def test_same_seed_same_loss_curve_and_resume_continues_it(tmp_path, optimizer):
    recipe = dataclasses.replace(TINY, optimizer=optimizer)
    straight = T.Trainer("sigma", recipe, seed=5, out_dir=tmp_path / "a", device="cpu")
    straight.run(progress=False)
    again = T.Trainer("sigma", recipe, seed=5, out_dir=tmp_path / "b", device="cpu")
    again.run(progress=False)
    assert straight.loss_curve == again.loss_curve

    interrupted = T.Trainer("sigma", recipe, seed=5, out_dir=tmp_path / "c", device="cpu")
    interrupted.run(stop_at=8, progress=False)                  # checkpoint at step 8, then "crash"
    resumed = T.Trainer("sigma", recipe, seed=5, out_dir=tmp_path / "c", device="cpu")
    resumed.load(tmp_path / "c" / "checkpoint.pt")
    assert resumed.step == 8
    resumed.run(progress=False)
    assert resumed.loss_curve == straight.loss_curve
    assert resumed.validation_curve == straight.validation_curve and len(straight.validation_curve) == 4   # step 0 too
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["checkpoint.pt"]      # no temporary file left


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    trainer = T.Trainer("gated", TINY, seed=0, out_dir=tmp_path, device="cpu")
    trainer.run(stop_at=4, progress=False)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    with torch.no_grad():
        trainer.model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"at step 4.*last good checkpoint is .*checkpoint.pt"):
        trainer.run(progress=False)
    after = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(saved[k], after[k]) for k in saved)


@settings(max_examples=20, deadline=None)
@given(encoder=st.sampled_from(["linear", "conv"]), background=st.lists(st.booleans(), max_size=12))
def test_background_patches_are_encoded_once_with_the_same_values_and_gradients(encoder, background):
    """encode_patches runs the encoder on the patches with content and one zero patch, and shares that one's
    output among all background patches: the same function as encoding every patch, gradients included."""
    torch.manual_seed(len(background))
    model = TinyMLLM(tiny_config("sigma", num_layers=1, patch_encoder=encoder))
    patches = torch.rand(len(background), D.PATCH_DIM)
    patches[torch.tensor(background, dtype=torch.bool)] = 0                           # [N, 192], some all zero
    grad_out = torch.randn(len(background), 32)
    shared, every = model.encode_patches(patches), model.patch_embedding(patches)
    assert shared.shape == every.shape == (len(background), 32)
    torch.testing.assert_close(shared, every, rtol=0, atol=1e-6)
    params = list(model.patch_embedding.parameters())
    for got, expected in zip(torch.autograd.grad(shared, params, grad_out), torch.autograd.grad(every, params, grad_out)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)            # zeros when there are no patches


def test_the_recipe_sets_the_mlp_width():
    for ratio in (1, 4):
        model = T.Trainer("sigma", TINY.updated(mlp_ratio=ratio), seed=0, device="cpu").model
        assert model.config.mlp_ratio == ratio
        assert all(block.mlp[0].out_features == ratio * TINY.model.hidden_size for block in model.blocks)


def test_muon_takes_the_blocks_weight_matrices_and_adamw_everything_else():
    trainer = T.Trainer("sigma", dataclasses.replace(TINY, optimizer="muon"), seed=0, device="cpu")
    adamw, muon = trainer.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, sr.optim.Muon)
    owner = {id(p): type(o).__name__ for o in trainer.optimizers for g in o.param_groups for p in g["params"]}
    names = dict(trainer.model.named_parameters())
    assert len(owner) == len(names)                      # every parameter in exactly one optimiser
    for name, p in names.items():
        expected = "Muon" if name.startswith("blocks.") and p.dim() == 2 else "AdamW"
        assert owner[id(p)] == expected, name
    assert owner[id(names["blocks.0.attn.q_proj.weight"])] == "Muon"
    assert owner[id(names["token_embedding.weight"])] == "AdamW"        # tied with the output head
    with pytest.raises(ValueError, match="optimizer must be one of"):
        T.Trainer("sigma", dataclasses.replace(TINY, optimizer="sgd"), seed=0, device="cpu")


@pytest.mark.parametrize("encoder", ["linear", "conv"])
def test_muon_scope_blocks_and_patch_adds_only_the_patch_projection(encoder):
    recipe = TINY.updated(optimizer="muon", muon_scope="blocks+patch", muon_momentum=0.9, patch_encoder=encoder)
    trainer = T.Trainer("sigma", recipe, seed=0, device="cpu")
    adamw, muon = trainer.optimizers
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    names = dict(trainer.model.named_parameters())
    moved = sorted(n for n, p in names.items() if id(p) in in_muon and not n.startswith("blocks."))
    assert moved == ["patch_embedding.weight" if encoder == "linear" else "patch_embedding.4.weight"]
    assert all(g["momentum"] == 0.9 for g in muon.param_groups)


def test_float32_muon_follows_torch_muon_step_for_step():
    """sigma_ref.optim.Muon is torch.optim.Muon with the Newton-Schulz iteration in float32 instead of bfloat16:
    after several steps on the same gradients the weights agree to bfloat16's precision, and a plain
    (non-orthogonalised) momentum step would not. A tall matrix shares its transpose's batched iteration."""
    torch.manual_seed(0)
    weights = [torch.randn(64, 256) * 0.02, torch.randn(256, 64) * 0.02, torch.randn(96, 64) * 0.02,
               torch.randn(64, 64) * 0.02]
    ours = [torch.nn.Parameter(w.clone()) for w in weights]
    theirs = [torch.nn.Parameter(w.clone()) for w in weights]
    sgd = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizers = [sr.optim.Muon(ours, lr=3e-3, weight_decay=0.05),
                  torch.optim.Muon(theirs, lr=3e-3, weight_decay=0.05, adjust_lr_fn="match_rms_adamw"),
                  torch.optim.SGD(sgd, lr=3e-3, momentum=0.95, nesterov=True)]
    for _ in range(5):
        grads = [torch.randn_like(w) for w in weights]
        for params, optimizer in zip((ours, theirs, sgd), optimizers):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
    for mine, reference, start, plain in zip(ours, theirs, weights, sgd):
        moved = (reference - start).abs().max()
        assert (mine - reference).abs().max() < 0.02 * moved
        assert (plain - reference).abs().max() > 0.5 * moved
    assert set(optimizers[0].state_dict()["state"][0]) == set(optimizers[1].state_dict()["state"][0])


def test_training_stops_at_the_target_and_records_when(tmp_path):
    """A target of 0 is reached at the first check: the run stops there, says when, and a resume adds nothing."""
    recipe = dataclasses.replace(TINY, target_exact_match=0.0, target_every=6, target_samples=4)
    trainer = T.Trainer("gated", recipe, seed=0, out_dir=tmp_path, device="cpu")
    trainer.run(progress=False)
    assert trainer.step == 6 and trainer.finished
    assert trainer.target_reached == {"step": 6, "train_seconds": trainer.train_seconds,
                                      "exact_match": trainer.exact_match_curve[-1][2]}
    resumed = T.Trainer("gated", recipe, seed=0, out_dir=tmp_path, device="cpu")
    resumed.load(tmp_path / "checkpoint.pt")
    assert resumed.finished and resumed.target_reached == trainer.target_reached
    resumed.run(progress=False)
    assert resumed.step == 6


def test_curves_start_at_initialisation_and_a_resume_does_not_record_it_again(tmp_path):
    from sigma_ref.probes import gate_means
    recipe = dataclasses.replace(TINY, eval_every=5)
    trainer = T.Trainer("sigma", recipe, seed=0, out_dir=tmp_path, device="cpu")
    untrained = copy.deepcopy(trainer.model)
    trainer.run(stop_at=5, progress=False)
    assert [h["step"] for h in trainer.gate_history] == [0, 5] and trainer.validation_curve[0][0] == 0
    batch = D.collate([D.encode(s) for s in D.load_split("validation")[:32]])
    assert trainer.gate_history[0]["gates"] == gate_means(untrained, batch)
    resumed = T.Trainer("sigma", recipe, seed=0, out_dir=tmp_path, device="cpu")
    resumed.load(tmp_path / "checkpoint.pt")
    resumed.run(stop_at=10, progress=False)
    assert [h["step"] for h in resumed.gate_history] == [0, 5, 10]


def test_training_stops_only_after_target_checks_in_a_row(tmp_path, monkeypatch):
    """With target_checks=2 a check at the target is not enough: the next one must be there too; a check below
    it starts the count again."""
    readings = iter([0.9, 0.5, 0.9, 0.95, 0.2])
    monkeypatch.setattr(T, "exact_match", lambda model, scenes, batches=None: {"exact_match": next(readings)})
    recipe = dataclasses.replace(TINY, steps=50, target_exact_match=0.9, target_every=2, target_samples=4,
                                 target_checks=2)
    trainer = T.Trainer("standard", recipe, seed=0, device="cpu")
    trainer.run(progress=False)
    assert [em for _, _, em in trainer.exact_match_curve] == [0.9, 0.5, 0.9, 0.95]
    assert trainer.step == 8 and trainer.target_reached["exact_match"] == 0.95


def test_an_unreachable_target_trains_the_whole_budget_and_checks_at_each_interval():
    recipe = dataclasses.replace(TINY, target_exact_match=1.0, target_every=5, target_samples=4)
    trainer = T.Trainer("standard", recipe, seed=0, device="cpu")
    trainer.run(progress=False)
    assert trainer.step == TINY.steps and trainer.target_reached is None
    assert [step for step, _, _ in trainer.exact_match_curve] == [5, 10]
    seconds = [s for _, s, _ in trainer.exact_match_curve]
    assert 0 < seconds[0] < seconds[1] <= trainer.train_seconds


@pytest.mark.parametrize("field, value, expected", [("target_exact_match", 1.5, "between 0 and 1"),
                                                     ("target_every", 0, "int >= 1"),
                                                     ("target_checks", 0, "int >= 1"),
                                                     ("mlp_ratio", 0, "int >= 1"),
                                                     ("num_layers", 0, "int >= 1"),
                                                     ("optimizer", "sgd", "one of"),
                                                     ("muon_scope", "everything", "one of"),
                                                     ("muon_momentum", 1.0, r"in \[0, 1\)"),
                                                     ("muon_momentum", True, r"in \[0, 1\)")])
def test_train_config_rejects_bad_values(field, value, expected):
    with pytest.raises(ValueError, match=f"Config.{field}.*{expected}"):      # TrainConfig or ModelConfig
        TINY.updated(**{field: value})


def test_learning_rate_schedule():
    lrs = [T.learning_rate(s, TINY) for s in range(TINY.steps + 1)]
    assert lrs[0] < lrs[2] <= TINY.lr and math.isclose(max(lrs), TINY.lr)
    assert math.isclose(lrs[-1], 0.1 * TINY.lr)


def test_resume_rejects_a_checkpoint_of_another_model(tmp_path):
    T.Trainer("sigma", TINY, seed=0, out_dir=tmp_path, device="cpu").run(stop_at=4, progress=False)
    with pytest.raises(ValueError, match="checkpoint .* is for attention='sigma'"):
        T.Trainer("standard", TINY, seed=0, device="cpu").load(tmp_path / "checkpoint.pt")


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset must be one of"):
        T.get_preset("laptop")


def test_metrics_json_has_every_field(tmp_path, monkeypatch):
    monkeypatch.setitem(T.PRESETS, "tiny", TINY)
    metrics = R.train_and_evaluate("sigma", "tiny", 0, tmp_path, progress=False, device="cpu")
    written = json.loads((tmp_path / "metrics.json").read_text())
    for key in ["caption_exact_match", "slot_accuracy", "compositional_exact_match", "text_only_accuracy",
                "dilution", "train_seconds", "steps", "parameters", "loss_curve", "validation_curve", "config"]:
        assert key in written
    assert set(written["dilution"]["blank"]) == {"0", "16", "64"}
    assert set(written["slot_accuracy"]) >= {"size_1", "colour_1", "shape_1"}
    assert written["steps"] == TINY.steps and written["parameters"] == metrics["parameters"] > 0
    assert 0 <= written["caption_exact_match"] <= 1


@pytest.fixture(scope="module")
def half_trained():
    """SIGMA on the cpu recipe stopped early, where about a third of the captions come out right: exact match
    has something to tell apart (a model that gets none or all right would agree with any method)."""
    trainer = T.Trainer("sigma", T.get_preset("cpu").updated(target_exact_match=None), seed=3, device="cpu")
    trainer.run(stop_at=150, progress=False)
    return trainer.model.eval()


@pytest.mark.parametrize("split,inserted,kind", [("validation", 0, "blank"), ("compositional", 0, "blank"),
                                                 ("text_only", 16, "noise"), ("text_only", 64, "blank")])
def test_exact_match_without_decoding_is_greedy_decodings(half_trained, split, inserted, kind):
    scenes = D.load_split(split)[:150]
    greedy = E.evaluate(half_trained, scenes, inserted, kind)
    one_pass = E.exact_match(half_trained, scenes, inserted, kind)
    if split == "validation":
        assert 0.1 < greedy["exact_match"] < 0.9          # some captions right, some wrong
    assert one_pass == {"exact_match": greedy["exact_match"], "loss": greedy["loss"]}
    # Batches encoded once (what the stopping rule reads at every check) give the very same reading.
    assert E.exact_match(half_trained, None, batches=E.teacher_forced_batches(scenes, inserted, kind)) == one_pass
    with pytest.raises(ValueError, match="batches: expected at least one batch"):
        E.exact_match(half_trained, None, batches=[])


def test_a_caption_too_long_to_decode_is_refused_by_name():
    scene = copy.deepcopy(D.load_split("test")[0])
    obj = {"colour": "red", "shape": "square", "size": "small", "x": 5, "y": 5}
    scene["objects"], scene["relation"] = [dict(obj) for _ in range(4)], "left of"       # 4 objects: 18 words
    with pytest.raises(ValueError, match=r"scenes: every caption must be shorter than 16 words .* got 18"):
        E.teacher_forced_batches([scene])
