"""One config shape: each option declared once, the attention kinds listed once, every option carried from
the command line to a trained model and its checkpoint, and configs written before this shape still read."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sigma_ref as sr
from sigma_ref import __main__ as cli
from sigma_ref import data as D
from sigma_ref import evaluate as E
from sigma_ref import train as T
from sigma_ref.attention import AttentionConfig, StandardAttention
from sigma_ref.lab import experiments as X
from sigma_ref.model import ATTENTIONS, ModelConfig, TinyMLLM

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
TINY = T.TrainConfig(tiny_config(), steps=6, batch_size=8, warmup_steps=2, eval_every=3, eval_samples=8,
                     checkpoint_every=3)


def names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_no_option_is_declared_at_two_levels():
    levels = [names(T.TrainConfig) - {"model"}, names(ModelConfig) - {"attn"}, names(AttentionConfig)]
    for i, upper in enumerate(levels):
        for lower in levels[i + 1:]:
            assert not upper & lower, f"declared twice: {sorted(upper & lower)}"
    assert dataclasses.fields(ModelConfig)[1].type in ("AttentionConfig", AttentionConfig)


def test_the_attention_kinds_are_listed_once():
    kinds = tuple(ATTENTIONS)
    assert X.ATTENTION_KINDS == kinds and cli.KINDS == kinds
    parser_kinds = {action.dest: action.choices for action in _subparser("train")._actions}
    assert tuple(parser_kinds["attention"]) == kinds


def _subparser(name):
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a.choices, dict))
    return subparsers.choices[name]


def test_a_fourth_kind_registered_in_one_place_builds_and_trains(monkeypatch):
    class Halved(StandardAttention):
        """A stand-in fourth attention: standard attention at half the output."""
        def forward(self, x, modality_ids, **kw):
            out = super().forward(x, modality_ids, **kw)
            return (out[0] / 2, out[1]) if isinstance(out, tuple) else out / 2

    monkeypatch.setitem(ATTENTIONS, "halved", Halved)
    trainer = T.Trainer("halved", TINY, seed=0, device="cpu")
    assert all(isinstance(block.attn, Halved) for block in trainer.model.blocks)
    assert trainer.config.model.attention == "halved"
    trainer.run(stop_at=2, progress=False)
    with pytest.raises(ValueError, match=r"ModelConfig.attention must be one of .*'halved'.*got 'nope'"):
        tiny_config("nope")


options = st.fixed_dictionaries({
    "attention": st.sampled_from(tuple(ATTENTIONS)),
    "num_intra_heads": st.one_of(st.integers(0, 4), st.tuples(st.integers(0, 4), st.integers(0, 4))),
    "bias_init": st.tuples(*[st.tuples(st.floats(-3, 3), st.floats(-3, 3))] * 2),
    "use_gates": st.booleans(), "use_stream_bias": st.booleans(), "headwise_gate": st.booleans(),
    "backend": st.sampled_from(("auto", "math", "packed")), "precision": st.sampled_from(("float32", "bfloat16")),
    "mlp_ratio": st.integers(1, 3), "patch_encoder": st.sampled_from(("linear", "conv")),
    "moda_gram": st.sampled_from(("kk", "kv")), "moda_duplex": st.booleans(), "moda_causal": st.booleans(),
    "moda_pseudo_logit": st.booleans(), "lr": st.floats(1e-4, 1e-2), "steps": st.integers(1, 50)}).filter(
    lambda o: not (o["attention"] == "moda" and o["backend"] == "packed"))     # MODA computes densely


@settings(max_examples=25, deadline=None)
@given(options)
def test_every_option_reaches_the_model_and_survives_the_checkpoint_form(changes):
    recipe = TINY.updated(**changes)
    assert T.TrainConfig(**recipe.as_dict()) == recipe                # what checkpoints and metrics.json hold
    model = TinyMLLM(recipe.model)
    splits = changes["num_intra_heads"] if isinstance(changes["num_intra_heads"], tuple) else (changes["num_intra_heads"],) * 2
    for block, split in zip(model.blocks, splits, strict=True):
        layer = block.attn.config
        assert (layer.bias_init, layer.use_gates, layer.use_stream_bias, layer.headwise_gate, layer.backend) == \
               tuple(changes[k] for k in ("bias_init", "use_gates", "use_stream_bias", "headwise_gate", "backend"))
        assert layer.num_intra_heads == split and block.mlp[0].out_features == changes["mlp_ratio"] * 32
        if changes["attention"] == "gated":
            assert block.attn.gate_proj.out_features == (4 if changes["headwise_gate"] else 32)
        if changes["attention"] == "moda":
            assert (block.attn.text_aligner is not None, block.attn.p_base is not None) == \
                   (changes["moda_duplex"], changes["moda_pseudo_logit"])
            assert (layer.moda_gram, layer.moda_causal) == (changes["moda_gram"], changes["moda_causal"])
    assert (recipe.lr, recipe.steps, recipe.model.precision) == (changes["lr"], changes["steps"], changes["precision"])


def test_the_headwise_gate_reaches_a_trained_model_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setitem(T.PRESETS, "cpu", TINY)
    cli.main(["train", "--attention", "gated", "--headwise-gate", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["config"]["model"]["attn"]["headwise_gate"] is True
    model = E.load_model(tmp_path / "checkpoint.pt")
    assert [block.attn.gate_proj.out_features for block in model.blocks] == [4, 4]
    assert model.config == TINY.updated(attention="gated", headwise_gate=True).model


def test_updated_names_an_unknown_option():
    with pytest.raises(ValueError, match=r"'hidden' is not an option of ModelConfig or AttentionConfig"):
        TINY.updated(hidden=64)


def test_a_new_head_count_takes_the_default_split_unless_one_is_given():
    config = tiny_config(num_intra_heads=1)
    assert config.updated(num_heads=8).attn.num_intra_heads == 4
    assert config.updated(num_heads=8, num_intra_heads=3).attn.num_intra_heads == 3


def test_flat_model_configs_of_earlier_runs_still_read():
    """Runs written before the attention's options moved into `attn` recorded a flat model_config; the fixture
    holds seed 0's record of each attention as results/cpu committed it then."""
    records = json.loads((ROOT / "tests" / "fixtures" / "flat_configs.json").read_text())
    assert set(records) == {"standard", "gated", "sigma"}
    for attention, record in records.items():
        assert "attn" not in record["model_config"] and "hidden_size" in record["config"]
        assert ModelConfig.from_dict(record["model_config"]) == T.get_preset("cpu").updated(attention=attention).model


def test_a_checkpoint_of_the_old_form_loads_into_the_same_model(tmp_path):
    """load_model reads a checkpoint that holds the model config flat, as checkpoints did before."""
    trainer = T.Trainer("sigma", TINY.updated(num_intra_heads=(1, 3)), seed=0, out_dir=tmp_path, device="cpu")
    trainer.run(stop_at=3, progress=False)
    state = torch.load(trainer.checkpoint_path, weights_only=False)
    model = state["config"].pop("model")
    flat = {k: v for k, v in model.items() if k not in ("attn", "intra_heads_per_layer")}
    state["model_config"] = {**flat, **model["attn"], "num_intra_heads": model["intra_heads_per_layer"]}
    old = tmp_path / "old.pt"
    torch.save(state, old)
    loaded, current = E.load_model(old), E.load_model(trainer.checkpoint_path)
    assert loaded.config == current.config and [b.attn.num_intra_heads for b in loaded.blocks] == [1, 3]
    batch = D.collate([D.encode(s) for s in D.load_split("validation")[:4]])
    torch.testing.assert_close(loaded(batch).logits, current(batch).logits, rtol=0, atol=0)


def test_the_recipe_a_run_resumes_with_includes_its_model(tmp_path):
    """A checkpoint records the whole run: resuming it with another attention option is refused."""
    T.Trainer("sigma", TINY, 0, tmp_path, device="cpu").run(stop_at=3, progress=False)
    other = T.Trainer("sigma", TINY, 0, device="cpu", model_overrides={"use_stream_bias": False})
    with pytest.raises(ValueError, match="another recipe"):
        other.load(tmp_path / "checkpoint.pt")


def test_the_package_exports_the_configs():
    assert sr.ModelConfig is ModelConfig and sr.AttentionConfig is AttentionConfig
