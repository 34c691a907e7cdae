"""A toy captioning set whose captions cannot be written without looking at the image.

SCENES. A 32x32 RGB image holds one or two objects. Each object has a colour (6), a shape (4) and a size
(2); two objects stand side by side or one above the other. The caption names everything, the left (or
upper) object first: "a small red circle left of a large blue square". That rule matters: with "right of"
and "below" allowed too, "A left of B" and "B right of A" would describe the same image, and no model could
match the reference caption more than half the time on two-object scenes.

TWO TASKS, mixed in training:
    describe   prompt "describe", 16 image patches, "<answer>", caption, "<eos>"
    expand     prompt "expand" + a terse attribute list in another order ("circle red small above square blue
               large"), "<answer>", the full caption. Text only: it needs within-text modelling, which is what
               the seed says image tokens dilute. The dilution experiment inserts 16 or 64 blank or noise
               image tokens between the list and "<answer>" and measures the accuracy again.

SPLITS. Training samples are drawn on the fly from seeds >= TRAIN_SEED_BASE. The evaluation splits are fixed
and shipped in data/ (a wheel carries them in the package) as JSON lines of scenes, images rendered from each
scene: test, validation, compositional (each sample holds a colour-shape pair training never shows) and
text_only. data/CARD.md lists sizes and sha256 sums; `python -m sigma_ref data --check` verifies them.

POSITIONS. Text tokens are numbered among text tokens only and patches by their (row, column), so inserting
image tokens shifts no text position: the dilution experiment measures attention, not positional encoding.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .checks import check_choice, check_int
from .masks import IMAGE, TEXT

IMAGE_SIZE, PATCH_SIZE = 32, 8
GRID = IMAGE_SIZE // PATCH_SIZE                      # 4 x 4 = 16 patches
NUM_PATCHES = GRID * GRID
PATCH_DIM = PATCH_SIZE * PATCH_SIZE * 3

COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95),
           "yellow": (0.95, 0.9, 0.1), "purple": (0.6, 0.15, 0.8), "cyan": (0.1, 0.85, 0.9)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 4, "large": 7}                      # radius in pixels
RELATIONS = ("left of", "above")             # the left / upper object is named first
# Colour-shape pairs never shown in training (images or text): the compositional split is made of them.
HELD_OUT_PAIRS = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "diamond"), ("yellow", "square")})

SPECIAL_TOKENS = ("<pad>", "<eos>", "<answer>", "<image>", "describe", "expand")
WORDS = ("a", "of", "left", "above") + tuple(SIZES) + tuple(COLOURS) + SHAPES
VOCAB = SPECIAL_TOKENS + WORDS
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
PAD, EOS, ANSWER, IMAGE_TOKEN = (TOKEN_ID[t] for t in ("<pad>", "<eos>", "<answer>", "<image>"))
IGNORE = -100                                          # target value that the loss skips

SPLITS = {"test": (500, 1), "validation": (300, 2), "compositional": (300, 3), "text_only": (300, 4)}
TRAIN_SEED_BASE = 1_000_000
# The shipped splits live in the repository's data/. A wheel carries that folder inside the package as
# sigma_ref/_data/ (pyproject.toml maps it at build time), so an installed package finds its own copy and a
# checkout (editable install, or the source tree on sys.path) finds data/ beside the package.
_WHEEL_DATA = importlib.resources.files(__package__) / "_data"
DATA_DIR = _WHEEL_DATA if _WHEEL_DATA.is_dir() else Path(__file__).resolve().parents[1] / "data"


def model_fields() -> dict:
    """What a model needs to know of this data set: `ModelConfig(attention=..., **model_fields())`."""
    return {"vocab_size": len(VOCAB), "pad_id": PAD, "eos_id": EOS, "answer_id": ANSWER, "ignore_index": IGNORE,
            "patch_dim": PATCH_DIM, "grid": GRID}


# ---------------------------------------------------------------------------------------------------
# Scenes and captions
# ---------------------------------------------------------------------------------------------------


def sample_object(rng: random.Random, held_out: bool | None) -> dict:
    """An object's attributes. held_out: True = a held-out colour-shape pair, False = never one, None = any."""
    while True:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if held_out is None or ((colour, shape) in HELD_OUT_PAIRS) == held_out:
            return {"colour": colour, "shape": shape, "size": rng.choice(list(SIZES))}


def sample_scene(rng: random.Random, task: str = "describe", compositional: bool = False) -> dict:
    """A scene: objects with positions, a relation (two objects), and which task it is for."""
    count = 1 if rng.random() < 1 / 3 else 2
    if compositional:        # at least one held-out pair, the other object anything
        objects = [sample_object(rng, True)] + [sample_object(rng, None) for _ in range(count - 1)]
        rng.shuffle(objects)
    else:
        objects = [sample_object(rng, False) for _ in range(count)]
    scene = {"task": task, "objects": objects, "relation": None}
    if count == 2:
        scene["relation"] = rng.choice(RELATIONS)
    place(rng, scene)
    return scene


def place(rng: random.Random, scene: dict) -> None:
    """Give each object a centre so that the relation (if any) is the only one that reads off the image."""
    objects, relation = scene["objects"], scene["relation"]
    for obj in objects:
        r = SIZES[obj["size"]]
        obj["x"], obj["y"] = rng.randint(r, IMAGE_SIZE - 1 - r), rng.randint(r, IMAGE_SIZE - 1 - r)
    if relation is None:
        return
    first, second = objects
    r1, r2 = SIZES[first["size"]], SIZES[second["size"]]
    half = IMAGE_SIZE // 2
    # One object per half along the relation's axis; the other coordinate in a narrow middle band, so the
    # distance along the relation's axis always exceeds the distance across it.
    low = lambda r: rng.randint(r, half - 1 - r)
    high = lambda r: rng.randint(half + r, IMAGE_SIZE - 1 - r)
    band = lambda: rng.randint(half - 3, half + 2)
    if relation == "left of":
        first["x"], second["x"] = low(r1), high(r2)
        first["y"], second["y"] = band(), band()
    else:                                                 # "above": image rows grow downwards
        first["y"], second["y"] = low(r1), high(r2)
        first["x"], second["x"] = band(), band()


def caption_words(scene: dict) -> list[str]:
    """The full caption: "a small red circle left of a large blue square"."""
    words = []
    for i, obj in enumerate(scene["objects"]):
        if i == 1:
            words += scene["relation"].split()
        words += ["a", obj["size"], obj["colour"], obj["shape"]]
    return words


def terse_words(scene: dict) -> list[str]:
    """The expand task's prompt: shape colour size per object, relation without "of"."""
    words = []
    for i, obj in enumerate(scene["objects"]):
        if i == 1:
            words.append(scene["relation"].split()[0])
        words += [obj["shape"], obj["colour"], obj["size"]]
    return words


def caption_slots(words: list[str]) -> dict[str, str | None]:
    """Parse a caption into slots (size/colour/shape of each object, relation); None where it does not parse."""
    slots = dict.fromkeys(["size_1", "colour_1", "shape_1", "relation", "size_2", "colour_2", "shape_2"])
    text = " ".join(words)
    pattern = r"a (\w+) (\w+) (\w+)(?: (left of|above) a (\w+) (\w+) (\w+))?"
    match = re.fullmatch(pattern, text)
    if match:
        for key, value in zip(slots, match.groups()):
            slots[key] = value
    return slots


@functools.lru_cache(maxsize=None)
def _shape_mask(shape: str, size: str, x: int, y: int) -> torch.Tensor:
    """[32, 32] bool: the pixels of one object. Cached: a training batch renders ~35 images, from at most
    4 shapes x 2 sizes x 32 x 32 placements, so after warm-up rendering is a table lookup."""
    rows, cols = torch.meshgrid(torch.arange(IMAGE_SIZE), torch.arange(IMAGE_SIZE), indexing="ij")
    dx, dy, r = (cols - x).float(), (rows - y).float(), SIZES[size]
    return {"circle": lambda: dx ** 2 + dy ** 2 <= r * r + 0.5,
            "square": lambda: (dx.abs() <= r - 0.5) & (dy.abs() <= r - 0.5),
            "diamond": lambda: dx.abs() + dy.abs() <= r,
            "triangle": lambda: (dy <= r) & (dy >= -r) & (2 * dx.abs() <= dy + r)}[shape]()


_COLOUR_PIXELS = {name: torch.tensor(rgb)[:, None, None] for name, rgb in COLOURS.items()}     # [3, 1, 1]


def render(scene: dict) -> torch.Tensor:
    """The image of a scene: FloatTensor [3, 32, 32] in [0, 1], black background."""
    image = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE)
    for obj in scene["objects"]:
        mask = _shape_mask(obj["shape"], obj["size"], obj["x"], obj["y"])                   # [32, 32]
        image = torch.where(mask, _COLOUR_PIXELS[obj["colour"]], image)
    return image


def patchify(image: torch.Tensor) -> torch.Tensor:
    """[3, 32, 32] -> [16, 192]: 8x8 patches in row-major order, each flattened."""
    patches = image.unfold(1, PATCH_SIZE, PATCH_SIZE).unfold(2, PATCH_SIZE, PATCH_SIZE)   # [3, 4, 4, 8, 8]
    return patches.permute(1, 2, 0, 3, 4).reshape(NUM_PATCHES, PATCH_DIM)


@functools.lru_cache(maxsize=None)
def _object_patches(shape: str, size: str, x: int, y: int) -> torch.Tensor:
    """[16, 192] bool: an object's pixels, in patch layout."""
    return patchify(_shape_mask(shape, size, x, y)[None].expand(3, -1, -1))


_COLOUR_PATCHES = {name: patchify(pixels.expand(3, IMAGE_SIZE, IMAGE_SIZE)) for name, pixels in _COLOUR_PIXELS.items()}


def scene_patches(scene: dict) -> torch.Tensor:
    """patchify(render(scene)) [16, 192], painted straight into patch layout: patchify only moves pixels, so it
    commutes with painting. The same numbers (tests/test_data.py) in half the time, ~40 images a training step."""
    patches = torch.zeros(NUM_PATCHES, PATCH_DIM)
    for obj in scene["objects"]:
        patches = torch.where(_object_patches(obj["shape"], obj["size"], obj["x"], obj["y"]),
                              _COLOUR_PATCHES[obj["colour"]], patches)
    return patches


# ---------------------------------------------------------------------------------------------------
# Sequences and batches
# ---------------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One sequence, ready to batch. All lists have the sequence's length."""

    tokens: list[int]          # token ids; image positions hold <image>
    modality: list[int]        # TEXT or IMAGE
    patch_index: list[int]     # image positions: which patch (0..15, row-major); text: 0
    patches: torch.Tensor      # [num image tokens, 192]
    answer_start: int          # index of the first caption token (right after <answer>)
    caption: list[str]


def encode(scene: dict, inserted_image_tokens: int = 0, inserted_kind: str = "blank",
           generator: torch.Generator | None = None, inserted_at: int | None = None) -> Example:
    """Turn a scene into a sequence. `inserted_image_tokens` (expand task only): blank or noise image tokens
    that carry nothing about the caption, for the dilution experiment; they go after the first `inserted_at`
    words of the attribute list (default: after all of them, right before <answer>)."""
    caption = caption_words(scene)
    if scene["task"] == "describe":
        before, after = ["describe"], []
        patches = scene_patches(scene)
    else:
        words = terse_words(scene)
        at = len(words) if inserted_at is None else inserted_at
        check_int("inserted_at", at, 0, len(words), why="(words of the list)")
        if inserted_kind not in ("blank", "noise"):
            raise ValueError(f"inserted_kind must be 'blank' or 'noise', got {inserted_kind!r}")
        before, after = ["expand"] + words[:at], words[at:]
        if inserted_kind == "blank":
            patches = torch.zeros(inserted_image_tokens, PATCH_DIM)
        else:
            patches = torch.rand(inserted_image_tokens, PATCH_DIM, generator=generator)
    n_image = patches.shape[0]
    tokens = [TOKEN_ID[w] for w in before] + [IMAGE_TOKEN] * n_image + [TOKEN_ID[w] for w in after] + [ANSWER]
    answer_start = len(tokens)
    tokens += [TOKEN_ID[w] for w in caption] + [EOS]
    rest = len(tokens) - len(before) - n_image
    modality = [TEXT] * len(before) + [IMAGE] * n_image + [TEXT] * rest
    patch_index = [0] * len(before) + [i % NUM_PATCHES for i in range(n_image)] + [0] * rest
    return Example(tokens, modality, patch_index, patches, answer_start, caption)


def collate(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into a batch.

    tokens, modality, patch_index, text_position, targets: [B, S]; patches: [B, S, 192] (zeros at text
    positions); targets[b, i] is the token at i+1 for caption positions and IGNORE elsewhere.
    """
    length = max(len(e.tokens) for e in examples)
    # Built as Python lists and turned into tensors once: collate runs on every training step, and thousands
    # of small tensor writes cost more than the model's forward pass at the course's sizes.
    rows = {"tokens": [], "modality": [], "patch_index": [], "text_position": [], "targets": []}
    for e in examples:
        pad = length - len(e.tokens)
        rows["tokens"].append(e.tokens + [PAD] * pad)
        rows["modality"].append(e.modality + [TEXT] * pad)
        rows["patch_index"].append(e.patch_index + [0] * pad)
        positions, count = [], -1
        for m in e.modality:                      # position among text tokens; image tokens repeat the last
            count += m == TEXT
            positions.append(count)
        rows["text_position"].append(positions + list(range(count + 1, count + 1 + pad)))
        # Predict each caption token and <eos> from the token before it.
        n = len(e.tokens)
        rows["targets"].append([IGNORE] * (e.answer_start - 1) + e.tokens[e.answer_start:n] + [IGNORE] * (pad + 1))
    batch = {name: torch.tensor(values, dtype=torch.long) for name, values in rows.items()}
    batch["patches"] = torch.zeros(len(examples), length, PATCH_DIM)
    # Image positions in row-major order are each example's patches, one example after the other.
    batch["patches"][batch["modality"] == IMAGE] = torch.cat([e.patches for e in examples])
    return batch


class DataStream:
    """Endless training batches from a seeded generator whose position can be saved and restored.

    Seeds start at TRAIN_SEED_BASE, far from the fixed splits' seeds (1-4). `rng.getstate()` is what a
    checkpoint stores so that a resumed run sees exactly the batches it would have seen.

    max_irrelevant_images = k > 0 is the dilution experiment's training mix: every text-only sample carries
    a random number 0..k of blank or noise image tokens at a random place in its attribute list, so image
    tokens that say nothing are in distribution. k = 0 (the default) never inserts any, and draws exactly the
    random numbers it always drew, so its batches are unchanged.
    """

    def __init__(self, batch_size: int, seed: int, text_only_fraction: float = 0.25, max_irrelevant_images: int = 0):
        check_int("max_irrelevant_images", max_irrelevant_images, low=0)
        self.batch_size, self.text_only_fraction = batch_size, text_only_fraction
        self.max_irrelevant_images = max_irrelevant_images
        self.rng = random.Random(TRAIN_SEED_BASE + seed)

    def next(self) -> dict:
        scenes = [sample_scene(self.rng, "expand" if self.rng.random() < self.text_only_fraction else "describe")
                  for _ in range(self.batch_size)]
        return collate([self._encode(s) for s in scenes])

    def _encode(self, scene: dict) -> Example:
        if scene["task"] != "expand" or not self.max_irrelevant_images:
            return encode(scene)
        count = self.rng.randint(0, self.max_irrelevant_images)
        kind = self.rng.choice(("blank", "noise"))
        at = self.rng.randint(0, len(terse_words(scene)))
        noise = torch.Generator().manual_seed(self.rng.getrandbits(62))      # no global torch RNG is touched
        return encode(scene, count, kind, noise, at)


# ---------------------------------------------------------------------------------------------------
# The shipped splits and their data card
# ---------------------------------------------------------------------------------------------------


def make_split(name: str) -> list[dict]:
    """The scenes of a fixed evaluation split, generated from its own seed."""
    size, seed = SPLITS[check_choice("split", name, SPLITS)]
    rng = random.Random(seed)
    task = "expand" if name == "text_only" else "describe"
    return [sample_scene(rng, task, compositional=(name == "compositional")) for _ in range(size)]


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_splits(directory: str | Path | None = None) -> None:
    """Write every split as JSON lines, the vocabulary, and the data card with sizes and sha256 sums."""
    directory = Path(str(DATA_DIR) if directory is None else directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in SPLITS:
        path = directory / f"{name}.jsonl"
        scenes = make_split(name)
        path.write_text("".join(json.dumps(s, sort_keys=True) + "\n" for s in scenes))
        rows.append((path.name, len(scenes), _sha256(path)))
    vocab_path = directory / "vocab.json"
    vocab_path.write_text(json.dumps(list(VOCAB), indent=1) + "\n")
    rows.append((vocab_path.name, len(VOCAB), _sha256(vocab_path)))
    table = "\n".join(f"| {name} | {count} | {digest} |" for name, count, digest in rows)
    (directory / "CARD.md").write_text(CARD_TEMPLATE.format(table=table, held_out=", ".join(
        f"{c} {s}" for c, s in sorted(HELD_OUT_PAIRS))))


CARD_TEMPLATE = """# Data card: the toy captioning set

Synthetic, generated by `sigma_ref/data.py` (`python -m sigma_ref data --regenerate` rewrites these files;
`python -m sigma_ref data --check` verifies them). No real images or text; no personal data.

- Images: 32x32 RGB, black background, one object (1/3 of scenes) or two (2/3) side by side ("left of") or
  one above the other ("above"), the left / upper one named first; 6 colours x 4 shapes x 2 sizes; 16
  patches of 8x8.
- Captions: "a SIZE COLOUR SHAPE [RELATION a SIZE COLOUR SHAPE]"; word-level vocabulary in vocab.json.
- Tasks: `describe` (caption an image) and `expand` (text only: rewrite a terse attribute list as a caption).
- Held-out colour-shape pairs, never in training and present in every compositional sample: {held_out}.
- Training data is generated on the fly from seeds >= 1,000,000; the splits below use seeds 1-4.
- Each line of a .jsonl file is one scene; images are rendered from it deterministically.

| file | items | sha256 |
|---|---|---|
{table}
"""


def check_splits(directory: str | Path | None = None) -> list[str]:
    """Problems with the shipped files (missing, changed, not matching the card); empty if all is well."""
    directory = DATA_DIR if directory is None else Path(directory)
    card = directory / "CARD.md"
    fix = "regenerate with `python -m sigma_ref data --regenerate`"
    if not card.is_file():
        return [f"{card} is missing; {fix}"]
    expected = re.findall(r"^\| (\S+\.(?:jsonl|json)) \| (\d+) \| ([0-9a-f]{64}) \|$", card.read_text(), re.M)
    problems = [] if expected else [f"{card} lists no files; {fix}"]
    for name, count, digest in expected:
        path = directory / name
        if not path.is_file():
            problems.append(f"{path} is missing; {fix}")
        elif _sha256(path) != digest:
            problems.append(f"{path} does not match its sha256 in {card.name} (changed or corrupted); {fix}")
    return problems


def load_split(name: str, directory: str | Path | None = None) -> list[dict]:
    """The scenes of a shipped split, after checking the file against the data card."""
    directory = DATA_DIR if directory is None else Path(directory)
    check_choice("split", name, SPLITS)
    problems = [p for p in check_splits(directory) if f"{name}.jsonl" in p or "CARD.md" in p]
    if problems:
        raise ValueError("; ".join(problems))
    return [json.loads(line) for line in (directory / f"{name}.jsonl").read_text().splitlines()]
