"""The dilution experiment's pieces: the training mix, inserted positions, the paired test, and one tiny run."""

import json

import pytest
import torch

from sigma_ref import data as D
from sigma_ref.lab import dilution
from sigma_ref import train as T
from sigma_ref.masks import IMAGE
from sigma_ref.model import ATTENTIONS
from sigma_ref.runtime import TRAINING_THREADS

from conftest import tiny_config

TINY = T.TrainConfig(tiny_config(), steps=6, batch_size=8, warmup_steps=2,
                     eval_every=3, eval_samples=8, checkpoint_every=3)


def test_the_default_mix_is_the_old_stream_and_the_new_mix_puts_irrelevant_images_only_in_text_only_samples():
    old, default = D.DataStream(16, 3), D.DataStream(16, 3, max_irrelevant_images=0)
    for _ in range(3):
        a, b = old.next(), default.next()
        assert all(torch.equal(a[k], b[k]) for k in a)
    mixed = D.DataStream(64, 3, text_only_fraction=1.0, max_irrelevant_images=8)
    batch = mixed.next()
    counts = (batch["modality"] == IMAGE).sum(1)
    assert counts.max() <= 8 and len(set(counts.tolist())) > 3             # 0..8, varied
    first_image = [row.tolist().index(IMAGE) for row in batch["modality"] if IMAGE in row.tolist()]
    assert len(set(first_image)) > 2                                        # at varied places in the list
    noisy = batch["patches"][batch["modality"] == IMAGE]
    assert (noisy.abs().sum(-1) == 0).any() and (noisy.abs().sum(-1) > 0).any()   # blank and noise
    describe = D.DataStream(8, 3, text_only_fraction=0.0, max_irrelevant_images=8).next()
    assert ((describe["modality"] == IMAGE).sum(1) == D.NUM_PATCHES).all()        # images only where they belong


def test_inserted_tokens_go_where_asked_and_text_positions_do_not_move():
    scene = D.load_split("text_only")[0]
    plain, moved = D.encode(scene), D.encode(scene, 3, "blank", None, inserted_at=1)
    assert [D.VOCAB[t] for t in moved.tokens[:5]] == ["expand", D.terse_words(scene)[0], "<image>", "<image>", "<image>"]
    assert [t for t, m in zip(moved.tokens, moved.modality) if m != IMAGE] == plain.tokens
    with pytest.raises(ValueError, match="inserted_at must be an int in 0"):
        D.encode(scene, 2, "blank", None, inserted_at=99)


def test_counts_reach_eight_times_what_training_showed():
    assert dilution.inserted_counts(16) == (0, 8, 16, 32, 64, 128)


def test_a_tiny_dilution_run_writes_every_record_and_reuses_its_models(tmp_path, monkeypatch):
    monkeypatch.setitem(T.PRESETS, "tiny", TINY)
    dilution.run_dilution(1, tmp_path, workers=1, progress=False, preset="tiny", text_only_samples=6)
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["runs"]) == len(ATTENTIONS) * 2 * 2                # attentions x mixes x kinds
    assert {r["attention"] for r in results["runs"]} == set(ATTENTIONS)
    for record in results["runs"]:
        assert set(record["accuracy"]) == {str(n) for n in dilution.inserted_counts()} == set(record["loss"])
        assert record["max_train_images"] == dilution.MIXES[record["train_mix"]]
    assert {r["train_mix"] for r in results["runs"]} == set(dilution.MIXES)
    sigma = next(m for m in results["models"] if m["variant"] == "sigma")
    assert sigma["streams"][0] == ["intra", "intra", "global", "global"]
    assert all(mass == 0 for layer, streams in zip(sigma["image_mass"], sigma["streams"])
               for mass, s in zip(layer, streams) if s == "intra")          # intra heads never see the images
    assert (tmp_path / "dilution_curves.png").exists() and "sigma minus standard" in (tmp_path / "results.md").read_text()
    monkeypatch.setattr(T.Trainer, "run", lambda *a, **k: pytest.fail("retrained a finished model"))
    dilution.run_dilution(1, tmp_path, workers=1, progress=False, preset="tiny", text_only_samples=6)


def test_per_layer_split_builds_each_layer_with_its_own_heads():
    from sigma_ref.model import ModelConfig, TinyMLLM
    model = TinyMLLM(tiny_config(num_intra_heads=(4, 0)))
    assert [block.attn.num_intra_heads for block in model.blocks] == [4, 0]
    with pytest.raises(ValueError, match="one value per layer"):
        ModelConfig(num_layers=3, intra_heads_per_layer=(1, 2), **D.model_fields())
    with pytest.raises(ValueError, match="num_intra_heads must be an int in 0..4"):
        tiny_config(num_intra_heads=(1, 5))
    assert ModelConfig(**D.model_fields()).updated(num_intra_heads=[1, 2, 3, 4]).intra_heads_per_layer == (1, 2, 3, 4)


def test_load_metrics_rebuilds_the_tables_of_a_finished_run(tmp_path, monkeypatch):
    monkeypatch.setitem(T.PRESETS, "tiny", TINY)
    written = dilution.run_dilution(1, tmp_path, workers=1, progress=False, preset="tiny", text_only_samples=4)
    loaded, counts = dilution.load_metrics(tmp_path)
    assert counts == dilution.inserted_counts()
    assert dilution.main_table(loaded, counts) == dilution.main_table(written, counts)
    assert dilution.mechanism_table(loaded) == dilution.mechanism_table(written)


def test_sigma_parts_on_the_command_line(tmp_path, monkeypatch):
    """`train` takes SIGMA's switches and the training mix; metrics.json records the model they built."""
    from sigma_ref import __main__ as cli
    monkeypatch.setitem(T.PRESETS, "cpu", TINY)
    cli.main(["train", "--attention", "sigma", "--out", str(tmp_path), "--intra-heads", "3,0", "--bias-init",
              "0,0,-2,0", "--no-stream-bias", "--max-train-images", "8"])
    written = json.loads((tmp_path / "metrics.json").read_text())
    model = written["config"]["model"]
    assert model["intra_heads_per_layer"] == [3, 0] and model["attn"]["use_stream_bias"] is False
    assert model["attn"]["bias_init"] == [[0.0, 0.0], [-2.0, 0.0]] and written["config"]["max_irrelevant_images"] == 8
    assert written["threads"] == TRAINING_THREADS                          # the thread policy, as compare trains
    with pytest.raises(SystemExit, match="--bias-init needs 4 numbers"):
        cli.main(["train", "--attention", "sigma", "--out", str(tmp_path / "x"), "--bias-init", "1,2"])


def test_a_dilution_run_of_chosen_attentions_trains_those_and_their_ablations_only(tmp_path, monkeypatch):
    monkeypatch.setitem(T.PRESETS, "tiny", TINY)
    metrics = dilution.run_dilution(1, tmp_path, ablations=True, workers=1, progress=False, preset="tiny",
                                    text_only_samples=2, attentions=("standard", "moda"))
    assert {m["attention"] for m in metrics} == {"standard", "moda"}
    assert {m["variant"] for m in metrics} == {"standard", *dilution.MODA_ABLATIONS}
    with pytest.raises(ValueError, match=r"attentions entry must be one of .*got 'linear'"):
        dilution.run_dilution(1, tmp_path, workers=1, progress=False, preset="tiny", attentions=("linear",))
