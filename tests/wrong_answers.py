"""Two plausible wrong answers per course exercise: each notebook's check must reject both (tests/test_notebooks.py).

Kept with the tests, not in the notebooks, so that learner copies do not carry them.
"""

WRONG_ANSWERS = {
    "00_the_latte_problem": [
        """\
def image_share(k, m, delta):
    return m / (k + m)                                   # the scores' offset ignored
""",
        """\
import math


def image_share(k, m, delta):
    return m * math.exp(delta) / (k + m)                 # not renormalised
""",
    ],
    "01_masks": [
        """\
def intra_pairs(spec):
    ids = sr.layout(spec)
    return int((ids == sr.TEXT).sum()) ** 2 + int((ids == sr.IMAGE).sum()) ** 2
""",
        """\
def intra_pairs(spec):
    n = len(sr.layout(spec))
    return n * (n + 1) // 2
""",
        """\
def intra_pairs(spec):
    return int(sr.intra_mask(sr.layout(spec)).sum())     # right numbers, but it builds the mask
""",
    ],
    "02_split_heads": [
        """\
def unaffected_text_positions(spec):
    ids = sr.layout(spec)
    return (ids == sr.TEXT).nonzero().flatten().tolist()
""",
        """\
def unaffected_text_positions(spec):
    ids = sr.layout(spec)
    last_image = max([i for i in range(len(ids)) if ids[i] == sr.IMAGE], default=len(ids))
    return [i for i in range(len(ids)) if ids[i] == sr.TEXT and i < last_image]
""",
    ],
    "03_gates": [
        """\
import math


def global_bias_for_share(r, intra_bias):
    return math.log(r / (1 - r))                         # the intra gate ignored
""",
        """\
import math


def global_bias_for_share(r, intra_bias):
    return math.log(r / (1 - r)) + intra_bias            # logits added as if the gates were linear
""",
    ],
    "04_the_sigma_layer": [
        """\
def image_fraction_for_work(target, H, h):
    return H * (1 - target) / h                          # "an intra head does 1 - i of the work": linear
""",
        """\
import math


def image_fraction_for_work(target, H, h):
    product = H * (1 - target) / (2 * h)
    if not 0 <= product <= 0.25:
        raise ValueError("unreachable")
    return (1 + math.sqrt(1 - 4 * product)) / 2          # the other root: the TEXT fraction
""",
    ],
    "05_fast_and_exact": [
        """\
def cu_seqlens_of(ids):
    lengths = [int((row == m).sum()) for row in ids for m in (sr.TEXT, sr.IMAGE)]   # keeps empty segments
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
""",
        """\
def cu_seqlens_of(ids):
    lengths = [int((row == m).sum()) for m in (sr.TEXT, sr.IMAGE) for row in ids]   # modality before row
    lengths = [n for n in lengths if n > 0]
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
""",
    ],
    "06_train_the_tiny_mllm": [
        """\
def matching_slots(reference, generated):
    return len(set(reference.split()) & set(generated.split()))       # words in common
""",
        """\
def matching_slots(reference, generated):
    truth, guess = D.caption_slots(reference.split()), D.caption_slots(generated.split())
    return sum(guess[slot] == value for slot, value in truth.items())  # counts empty slots too
""",
    ],
    "07_seeing_the_latte_separate": [
        """\
def text_to_image_mass(model, batch, layer, head):
    with probes.math_backend(model):
        probs = model(batch, return_details=True).details[layer].attn_probs[:, head]
    real = batch["tokens"] != sr.data.PAD
    image_keys = (batch["modality"] == sr.IMAGE) & real
    queries = (batch["modality"] == sr.TEXT) & real                   # also text that cannot see an image
    return (probs * image_keys[:, None, :]).sum(-1)[queries].mean().item()
""",
        """\
def text_to_image_mass(model, batch, layer, head):
    with probes.math_backend(model):
        probs = model(batch, return_details=True).details[layer].attn_probs[:, head]
    real = batch["tokens"] != sr.data.PAD
    image_keys = (batch["modality"] == sr.IMAGE) & real
    queries = (batch["modality"] == sr.TEXT) & real & (torch.cumsum(image_keys.long(), 1) > 0)
    return (probs * image_keys[:, None, :]).sum(-1).mean().item()     # every row, image and padding too
""",
    ],
    "08_beyond": [
        """\
def relative_drop(metrics, kind, n):
    acc = metrics["dilution"][kind]
    return acc["0"] - acc[str(n)]                                     # absolute, not relative
""",
        """\
def relative_drop(metrics, kind, n):
    acc = metrics["dilution"][kind]
    return 0.0 if acc["0"] == 0 else acc[str(n)] / acc["0"]          # what is kept, not what is lost
""",
    ],
    "09_neighbours": [
        """\
def var_row(row, is_image, is_sink, p=0.4, rho=0.5, floor=0.2):
    image = sum(a for a, i in zip(row, is_image) if i)
    plain = sum(a for a, i, s in zip(row, is_image, is_sink) if i and not s)
    if image < floor or image == 0 or plain / image < rho or plain == 0:
        return list(row)
    freed = (1 - p) * sum(a for a, s in zip(row, is_sink) if s)        # the released code's p: the share KEPT
    return [a * p if s else a + freed * a / plain if i else a for a, i, s in zip(row, is_image, is_sink)]
""",
        """\
def var_row(row, is_image, is_sink, p=0.4, rho=0.5, floor=0.2):
    image = sum(a for a, i in zip(row, is_image) if i)
    plain = [i and not s for i, s in zip(is_image, is_sink)]
    plain_mass = sum(a for a, k in zip(row, plain) if k)
    if image < floor or image == 0 or plain_mass / image < rho or plain_mass == 0:
        return list(row)
    freed = p * sum(a for a, s in zip(row, is_sink) if s)
    share = freed / sum(plain)                                          # evenly, not in proportion
    return [a * (1 - p) if s else a + share if k else a for a, s, k in zip(row, is_sink, plain)]
""",
    ],
    "10_sigma_in_hugging_face": [
        """\
def sdpa_intra_mask(modality_ids, attention_mask):
    seq = modality_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()[None]
    return (causal & (modality_ids[:, :, None] == modality_ids[:, None, :]))[:, None]     # padding forgotten
""",
        """\
def sdpa_intra_mask(modality_ids, attention_mask):
    same = modality_ids[:, :, None] == modality_ids[:, None, :]
    return (same & attention_mask.bool()[:, None, :])[:, None]                        # the future is visible
""",
    ],
}
