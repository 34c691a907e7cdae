"""The course's toy captioning set in Hugging Face form: a real tokenizer, a torch Dataset, a collator, a tiny
LLaVA built from configs (nothing downloaded), and caption exact match by `generate`.

    tokenizer()                 a PreTrainedTokenizerFast over the toy vocabulary (tokenizers' WordLevel model)
    ToyCaptions(split | seed)   "describe" samples: prompt "describe <image>x16 <answer>", the caption, "<eos>";
                                labels are the caption and <eos> only (the prompt and the image are not targets)
    collate(features)           right-pads a list of samples into a batch for transformers.Trainer
    tiny_llava(...)             LlavaForConditionalGeneration: a CLIP vision tower over the 32x32 image in 8x8
                                patches (16 image tokens, as TinyMLLM has) and a Llama or Qwen2 language model
    caption_exact_match(model)  greedy captions of a split, compared word for word with the reference

The image goes through LLaVA's own route: 16 <image> tokens in input_ids, replaced by the projected CLIP
features, so `input_ids == image_token_index` marks the image positions that sigmafy reads.
"""

from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          PreTrainedTokenizerFast, Qwen2Config)

from .. import data as D
from ..checks import check_choice, check_int

PROMPT = ["describe"] + ["<image>"] * D.NUM_PATCHES + ["<answer>"]
TEXT_MODELS = {"llama": LlamaConfig, "qwen2": Qwen2Config}


def tokenizer() -> PreTrainedTokenizerFast:
    """The toy vocabulary as a fast tokenizer: one id per word, split on spaces, ids equal to data.TOKEN_ID."""
    word_level = Tokenizer(models.WordLevel(vocab=dict(D.TOKEN_ID), unk_token="<pad>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<pad>", padding_side="right")


class ToyCaptions(torch.utils.data.Dataset):
    """Describe samples of a shipped split (`split="test"`, ...) or `size` fresh training scenes drawn from
    `seed` (seeds far from the splits', as data.DataStream draws them)."""

    def __init__(self, split: str | None = None, size: int | None = None, seed: int = 0):
        if (split is None) == (size is None):
            raise ValueError(f"pass exactly one of split and size, got split={split!r}, size={size!r}")
        if split is not None:
            check_choice("split", split, [s for s in D.SPLITS if s != "text_only"])
            self.scenes = D.load_split(split)
        else:
            check_int("size", size, low=1)
            rng = random.Random(D.TRAIN_SEED_BASE + seed)
            self.scenes = [D.sample_scene(rng, "describe") for _ in range(size)]
        self.tokenizer = tokenizer()

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict:
        scene = self.scenes[index]
        prompt = self.tokenizer(" ".join(PROMPT))["input_ids"]
        answer = self.tokenizer(" ".join(D.caption_words(scene) + ["<eos>"]))["input_ids"]
        return {"input_ids": torch.tensor(prompt + answer),
                "labels": torch.tensor([D.IGNORE] * len(prompt) + answer),
                "pixel_values": D.render(scene),                                   # [3, 32, 32]
                "caption": " ".join(D.caption_words(scene))}


def collate(features: list[dict]) -> dict:
    """Right-pad input_ids (with <pad>) and labels (with IGNORE); attention_mask marks the real tokens."""
    length = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": torch.full((len(features), length), D.PAD),
             "labels": torch.full((len(features), length), D.IGNORE),
             "attention_mask": torch.zeros(len(features), length, dtype=torch.long)}
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        batch["input_ids"][row, :n] = f["input_ids"]
        batch["labels"][row, :n] = f["labels"]
        batch["attention_mask"][row, :n] = 1
    batch["pixel_values"] = torch.stack([f["pixel_values"] for f in features])     # [B, 3, 32, 32]
    return batch


def tiny_llava(text_model: str = "llama", hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
               num_key_value_heads: int = 2, attn_implementation: str = "sdpa", seed: int = 0):
    """A LlavaForConditionalGeneration small enough to train on a CPU in minutes, from configs only."""
    check_choice("text_model", text_model, TEXT_MODELS)
    text = TEXT_MODELS[text_model](
        vocab_size=len(D.VOCAB), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_key_value_heads,
        max_position_embeddings=64, pad_token_id=D.PAD, eos_token_id=D.EOS, bos_token_id=None,
        tie_word_embeddings=True)
    vision = CLIPVisionConfig(image_size=D.IMAGE_SIZE, patch_size=D.PATCH_SIZE, num_channels=3,
                              hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=1,
                              num_attention_heads=num_heads, projection_dim=hidden_size)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=D.IMAGE_TOKEN,
                         image_seq_length=D.NUM_PATCHES, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         pad_token_id=D.PAD, eos_token_id=D.EOS, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = D.PAD, D.EOS
    return model


@torch.no_grad()
def caption_exact_match(model, split: str = "test", limit: int | None = None, batch_size: int = 100) -> float:
    """Share of a split's images whose greedy caption equals the reference exactly (the course's metric)."""
    samples = ToyCaptions(split)
    count = len(samples) if limit is None else min(limit, len(samples))
    prompt_len, was_training = len(PROMPT), model.training
    model.eval()
    right = 0
    for start in range(0, count, batch_size):
        rows = [samples[i] for i in range(start, min(start + batch_size, count))]
        prompts = torch.stack([r["input_ids"][:prompt_len] for r in rows])          # every prompt: 18 tokens
        pixels = torch.stack([r["pixel_values"] for r in rows])
        out = model.generate(input_ids=prompts, pixel_values=pixels, attention_mask=torch.ones_like(prompts),
                             max_new_tokens=12, do_sample=False)
        for r, ids in zip(rows, out[:, prompt_len:].tolist()):
            words = [D.VOCAB[i] for i in ids[:ids.index(D.EOS)]] if D.EOS in ids else None
            right += words is not None and " ".join(words) == r["caption"]
    model.train(was_training)
    return right / count
