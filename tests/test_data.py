import json
import random
import shutil

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sigma_ref import data as D
from sigma_ref.masks import IMAGE, TEXT


def test_shipped_splits_match_the_card():
    assert D.check_splits() == []
    for name, (size, _) in D.SPLITS.items():
        assert len(D.load_split(name)) == size


def test_shipped_splits_are_what_the_generator_makes():
    for name in D.SPLITS:
        assert D.load_split(name) == json.loads(json.dumps(D.make_split(name)))


def test_changed_or_missing_file_is_reported_with_the_fix(tmp_path):
    shutil.copytree(str(D.DATA_DIR), tmp_path / "data")
    path = tmp_path / "data" / "test.jsonl"
    path.write_text(path.read_text().replace("red", "blue", 1))
    problems = D.check_splits(tmp_path / "data")
    assert len(problems) == 1 and "test.jsonl" in problems[0] and "sha256" in problems[0]
    assert "python -m sigma_ref data --regenerate" in problems[0]
    with pytest.raises(ValueError, match="test.jsonl.*regenerate"):
        D.load_split("test", tmp_path / "data")
    (tmp_path / "data" / "validation.jsonl").unlink()
    assert any("validation.jsonl is missing" in p for p in D.check_splits(tmp_path / "data"))
    D.write_splits(tmp_path / "data")
    assert D.check_splits(tmp_path / "data") == []


def test_training_never_shows_held_out_pairs_and_compositional_always_does():
    rng = random.Random(D.TRAIN_SEED_BASE)
    for _ in range(2000):
        scene = D.sample_scene(rng, rng.choice(["describe", "expand"]))
        assert not any((o["colour"], o["shape"]) in D.HELD_OUT_PAIRS for o in scene["objects"])
    for scene in D.load_split("compositional"):
        assert any((o["colour"], o["shape"]) in D.HELD_OUT_PAIRS for o in scene["objects"])


def test_relations_are_unambiguous_in_the_image():
    for scene in D.load_split("test"):
        if scene["relation"] is None:
            continue
        a, b = scene["objects"]
        dx, dy = b["x"] - a["x"], b["y"] - a["y"]           # image y grows downwards
        expected = {"left of": dx > abs(dy), "above": dy > abs(dx)}      # the first-named object is left / upper
        assert expected[scene["relation"]], scene


def test_render_draws_each_object_in_its_colour():
    scene = {"task": "describe", "relation": None,
             "objects": [{"colour": "red", "shape": "square", "size": "large", "x": 10, "y": 20}]}
    image = D.render(scene)
    assert image.shape == (3, 32, 32)
    assert torch.allclose(image[:, 20, 10], torch.tensor(D.COLOURS["red"]))
    assert image[:, 0, 0].sum() == 0
    assert D.patchify(image).shape == (16, 192)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2 ** 31), st.booleans())
def test_painting_in_patch_layout_is_patchify_of_the_rendered_image(seed, compositional):
    """The data stream paints scenes straight into patches; the pixels are those of render + patchify, to the
    bit, for one and two objects, overlapping or not, on the training and the held-out pairs."""
    rng = random.Random(seed)
    for _ in range(20):
        scene = D.sample_scene(rng, compositional=compositional)
        assert torch.equal(D.scene_patches(scene), D.patchify(D.render(scene)))
    assert torch.equal(D.encode(scene).patches, D.patchify(D.render(scene)))


def test_caption_round_trips_through_slots():
    scene = D.load_split("test")[1]
    slots = D.caption_slots(D.caption_words(scene))
    assert slots["colour_1"] == scene["objects"][0]["colour"]
    assert D.caption_slots("a red".split())["colour_1"] is None


def test_encode_and_collate_layout():
    describe, expand = D.load_split("test")[0], D.load_split("text_only")[0]
    e1, e2 = D.encode(describe), D.encode(expand, inserted_image_tokens=16, inserted_kind="noise")
    assert e1.modality.count(IMAGE) == 16 and e2.modality.count(IMAGE) == 16
    assert D.VOCAB[e1.tokens[e1.answer_start - 1]] == "<answer>"
    batch = D.collate([e1, e2, D.encode(expand)])
    B, S = batch["tokens"].shape
    assert batch["patches"].shape == (B, S, D.PATCH_DIM)
    # targets: exactly the caption and <eos>, each predicted from the token before it
    row = batch["targets"][0]
    taken = row[row != D.IGNORE].tolist()
    assert [D.VOCAB[t] for t in taken] == e1.caption + ["<eos>"]
    # text positions ignore image tokens: the expand prompt with and without 16 inserted tokens agrees
    with_img, without = batch["text_position"][1], batch["text_position"][2]
    text1 = with_img[batch["modality"][1] == TEXT][: len(D.encode(expand).tokens)]
    assert text1.tolist() == without[: len(text1)].tolist()


def test_encode_rejects_unknown_insert_kind():
    with pytest.raises(ValueError, match="inserted_kind must be 'blank' or 'noise'"):
        D.encode(D.load_split("text_only")[0], 4, "stripes")


def test_training_stream_is_reproducible():
    a, b = D.DataStream(8, seed=3), D.DataStream(8, seed=3)
    x, y = a.next(), b.next()
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(D.DataStream(8, seed=4).next()["tokens"], x["tokens"])
    b.rng.setstate(a.rng.getstate())                     # restoring the state continues the same stream
    assert torch.equal(a.next()["tokens"], b.next()["tokens"])
