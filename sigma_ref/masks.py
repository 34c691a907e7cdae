"""Attention masks for SIGMA, written so a learner can read each one as a definition.

Convention used everywhere in this package: a mask is a boolean tensor that is True where a query
(row) MAY attend to a key (column). This is the convention of `F.scaled_dot_product_attention` and
of FlexAttention's `mask_mod`, so no mask ever has to be inverted on its way to a kernel.

The three masks of the course:

    causal_mask(n)          query i sees keys 0..i                        (decoder LMs)
    intra_mask(ids)         query i sees keys j <= i of its OWN modality  (SIGMA intra stream)
    sigma_mask(ids, H, h)   per head: the intra mask for heads 0..h-1, causal for heads h..H-1

A sequence's modalities are a LongTensor of ids, TEXT = 0 and IMAGE = 1; `layout("T4 I16 T8")`
writes one from a short string. Right padding needs no mask of its own: with causal attention a
real token never looks to its right, so padding at the end of a row cannot reach it.

Run `python -m sigma_ref demo masks` to print the masks of a small interleaved layout.
"""

from __future__ import annotations

import re

import torch

from .checks import check_int

TEXT = 0
IMAGE = 1
NUM_MODALITIES = 2
MODALITY_LETTERS = {"T": TEXT, "I": IMAGE}
MODALITY_NAMES = {TEXT: "text", IMAGE: "image"}

_LAYOUT_PART = re.compile(r"([TI])(\d+)")


def layout(spec: str) -> torch.Tensor:
    """Modality ids from a run-length string: "T4 I16 T8" -> 4 text, 16 image, 8 text ids.

    Each part is a letter (T = text, I = image) followed by a positive count; parts are separated by
    whitespace. Returns a LongTensor of shape [total count].
    """
    if not isinstance(spec, str):
        raise ValueError(f"layout: spec must be a string like 'T4 I16 T8', got {type(spec).__name__}")
    parts = spec.split()
    if not parts:
        raise ValueError("layout: spec is empty; expected parts like 'T4 I16 T8'")
    ids = []
    for part in parts:
        match = _LAYOUT_PART.fullmatch(part)
        if match is None:
            raise ValueError(
                f"layout: part {part!r} of spec {spec!r} is malformed; expected a letter T (text) or "
                f"I (image) followed by a positive count, e.g. 'T4'"
            )
        letter, count = match.group(1), int(match.group(2))
        if count == 0:
            raise ValueError(f"layout: part {part!r} of spec {spec!r} has count 0; counts must be >= 1")
        ids.extend([MODALITY_LETTERS[letter]] * count)
    return torch.tensor(ids, dtype=torch.long)


def layout_string(modality_ids: torch.Tensor) -> str:
    """Inverse of `layout` for a 1-D id tensor: tensor([0, 0, 1]) -> "T2 I1"."""
    ids = _as_id_tensor(modality_ids, "modality_ids")
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"layout_string: modality_ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
    letters = {v: k for k, v in MODALITY_LETTERS.items()}
    parts, run_id, run_len = [], int(ids[0]), 0
    for value in ids.tolist():
        if value == run_id:
            run_len += 1
        else:
            parts.append(f"{letters[run_id]}{run_len}")
            run_id, run_len = value, 1
    parts.append(f"{letters[run_id]}{run_len}")
    return " ".join(parts)


def causal_mask(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """BoolTensor[n, n]: True where key j <= query i (each token sees itself and its past)."""
    check_int("causal_mask: n", n, low=1)
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def intra_mask(modality_ids: torch.Tensor) -> torch.Tensor:
    """BoolTensor[..., n, n]: same modality AND causal. The SIGMA intra stream's mask.

    Works on any leading batch shape: ids [n] -> [n, n], ids [B, n] -> [B, n, n].
    For a layout "T2 I2 T1" it is block-diagonal per modality after sorting; in the original order it
    looks like two interleaved lower triangles.
    """
    ids = validate_modality_ids(modality_ids, "modality_ids")
    same_modality = ids.unsqueeze(-1) == ids.unsqueeze(-2)            # [..., n, n]
    return same_modality & causal_mask(ids.shape[-1], device=ids.device)


def sigma_mask(modality_ids: torch.Tensor, num_heads: int, num_intra_heads: int) -> torch.Tensor:
    """BoolTensor[..., H, n, n]: the mask each SIGMA head uses.

    Heads 0 .. num_intra_heads-1 (the intra stream) get `intra_mask`; heads num_intra_heads .. H-1
    (the global stream) get the plain causal mask, so they may mix modalities.
    """
    check_int("sigma_mask: num_heads", num_heads, low=1)
    check_int("sigma_mask: num_intra_heads", num_intra_heads, 0, num_heads)
    intra = intra_mask(modality_ids)                                  # [..., n, n]
    causal = causal_mask(intra.shape[-1], device=intra.device).expand_as(intra)
    is_intra_head = torch.arange(num_heads, device=intra.device) < num_intra_heads   # [H]
    # Broadcast [H, 1, 1] against [..., 1, n, n] -> [..., H, n, n].
    return torch.where(is_intra_head[:, None, None], intra.unsqueeze(-3), causal.unsqueeze(-3))


# ---------------------------------------------------------------------------------------------------
# FlexAttention mask_mods. FlexAttention asks a function mask_mod(b, h, q_idx, kv_idx) -> bool for each
# (batch row, head, query, key); these builders close over the modality ids. They must use only tensor
# operations (no Python `if` on values) so FlexAttention can vmap and compile them.
# ---------------------------------------------------------------------------------------------------


def causal_mask_mod(b, h, q_idx, kv_idx):
    """FlexAttention mask_mod of the causal mask."""
    return kv_idx <= q_idx


def _same_group(group_ids: torch.Tensor):
    """same(b, q_idx, kv_idx): do query and key sit in the same group? group_ids [B, n] or [n], checked."""
    ids = group_ids if group_ids.dim() == 2 else group_ids.unsqueeze(0)
    shared = ids.shape[0] == 1

    def same(b, q_idx, kv_idx):
        row = ids[0] if shared else ids[b]
        return row[q_idx] == row[kv_idx]

    return same


def intra_mask_mod(modality_ids: torch.Tensor):
    """FlexAttention mask_mod of `intra_mask` for ids of shape [B, n] (or [n], shared by all rows)."""
    same = _same_group(validate_modality_ids(modality_ids, "modality_ids"))

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & same(b, q_idx, kv_idx)

    return mask_mod


def grouped_mask_mod(group_ids: torch.Tensor, num_grouped_heads: int):
    """FlexAttention mask_mod: heads below num_grouped_heads causal within groups, the rest plain causal.

    group_ids [B, n] (or [n]) may hold any ids >= 0 (two modalities, or one group per image); the caller
    checks them (kernels.GroupLayout does). `sigma_mask_mod` is this with modality ids as the groups.
    """
    same = _same_group(group_ids)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((h >= num_grouped_heads) | same(b, q_idx, kv_idx))

    return mask_mod


def sigma_mask_mod(modality_ids: torch.Tensor, num_intra_heads: int):
    """FlexAttention mask_mod of `sigma_mask`: heads below num_intra_heads use the intra mask."""
    return grouped_mask_mod(validate_modality_ids(modality_ids, "modality_ids"), num_intra_heads)


# ---------------------------------------------------------------------------------------------------
# Validation shared by the package: every public entry point that takes modality ids goes through here.
# ---------------------------------------------------------------------------------------------------


def _as_id_tensor(modality_ids, name: str) -> torch.Tensor:
    if not isinstance(modality_ids, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of integer modality ids, got {type(modality_ids).__name__}")
    if modality_ids.dtype.is_floating_point or modality_ids.dtype == torch.bool or modality_ids.is_complex():
        raise ValueError(f"{name} must have an integer dtype (e.g. torch.long), got {modality_ids.dtype}")
    return modality_ids


def validate_modality_ids(modality_ids, name: str = "modality_ids", num_modalities: int = NUM_MODALITIES) -> torch.Tensor:
    """Return `modality_ids` as a long tensor, or raise ValueError naming `name` and the bad values."""
    ids = _as_id_tensor(modality_ids, name)
    if ids.dim() == 0 or ids.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one position in its last dimension, got shape {tuple(ids.shape)}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= num_modalities:
        bad = low if low < 0 else high
        raise ValueError(
            f"{name} holds the value {bad}; expected ids in 0..{num_modalities - 1} "
            f"({', '.join(f'{k}={v}' for k, v in MODALITY_NAMES.items() if k < num_modalities)})"
        )
    return ids.long()


def _demo() -> None:
    ids = layout("T3 I4 T2")
    print("layout  :", layout_string(ids), "->", ids.tolist())
    for name, mask in [("causal", causal_mask(len(ids))), ("intra", intra_mask(ids))]:
        print(f"\n{name} mask (rows = queries, columns = keys, # = may attend)")
        letters = "".join("TI"[i] for i in ids.tolist())
        print("    " + letters)
        for letter, row in zip(letters, mask.tolist()):
            print(f"  {letter} " + "".join("#" if allowed else "." for allowed in row))


if __name__ == "__main__":
    _demo()
