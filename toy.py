"""The built-in shapes world: a 32x32 text-to-image world small enough to train on a CPU.

What it holds (nothing here is from the paper; it stands in for real prompts, images and
GenEval so that the whole method of arXiv 2605.27736 runs on any laptop):
  1. prompts: GenEval's six categories (single object, two objects, counting, colors,
     position, color attribution) over circles/squares/triangles in red/green/blue/yellow,
     with GenEval-style metadata (position prompts ask "left of"; counts are 2-4), and a fixed train / held-out split (held-out: RL never
     trains on them; the base models saw every prompt in pretraining, as real ones have);
  2. render(): a board of 4x4 cells of 8x8 pixels, each empty or one 6x6 shape; the world's
     VAE (pretrain.py) codes each cell as one latent token, so the denoisers work on a 4x4x4
     latent exactly as SD1.5 / SD3.5-M work on theirs. Where objects go is chosen so that it
     depends on the prompt and the cell alone (_cells: a counted group in reading order, the two
     sides of a relation each in its half of the board), which a tiny DiT learns in minutes;
     the checker itself is GenEval's rule and does not care where objects are;
  3. check(): scores an image against its prompt from pixels alone: GenEval-style strict
     pass/fail and a dense partial credit in [0, 1] (the `shapes` reward); well_formed()
     says whether an image is a board of this world at all;
  4. caption_scene(): the noisy captions the shipped base models were pretrained on (a count
     off by one, a colour changed, a relation reversed, an object left out of the caption):
     the base model's misalignment, which RL is there to fix (pretrain.py explains);
  5. `python toy.py eval --model tiny-dit` measures a model's held-out strict accuracy.

| GenEval / the paper's setting (the world itself: this project's addition, METHOD.md 9) | here |
|---|---|
| prompt metadata {tag, include, prompt} | make_metadata(include), prompts(split), prompt_metadata(prompt) |
| the strict verdict; partial credit (the `shapes` reward) | check(images, metadata) -> strict (B,) bool, score (B,); judge() |
| a web-trained base model's noisy alt-text (its misalignment) | caption_scene(meta, truthful, rng), corrupt(), CORRUPTIONS |
| GenEval accuracy of a model | evaluate(backbone, metas) -> (strict accuracy, mean partial credit) |

Over ~450 lines: the world is one concept (its prompts, scenes, captions and checker are written
against each other), and the base models' tokenizer and pipeline recipe (build_pipeline) live here
because pretrain.py, the bench scripts and the tests all build the world's models from them.

Tests: tests/test_toy.py (checker accuracy on correct and deliberately wrong scenes, caption
corruption rates, the VAE's round trip).
"""
import random
import re
import sys

import numpy as np
import torch

import cli
import geneval

RES = 32                                   # image side, pixels
CELL = 8                                   # cell side, pixels: one latent token after the VAE's 8x downsampling
GRID = RES // CELL                         # the board: GRID x GRID cells
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0),
          "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}
NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}
RELATIONS = geneval.POSITIONS            # GenEval's four; the parser and checker know them all
# The world's own position prompts ask one relation. With all four, which side the first-named shape
# goes to depends on the relation word *and* the word order *and* the cell, a three-way interaction
# the tiny DiT did not learn (its placements stayed at chance through 4,500 steps of pretraining);
# with one relation it learns the placement in minutes (bench/layout.py; BENCHMARKS.md, "Why the
# world is laid out as it is"). Corrupted captions and users' prompts still draw the other three.
ASKED_RELATIONS = ("left of",)
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
HELDOUT_FRACTION = 0.2

# ----------------------------------------------------------------------------- prompts


def _phrase(entry):
    count, color, shape = entry["count"], entry.get("color"), entry["class"]
    words = [NUMBERS[count]] + ([color] if color else []) + [shape + ("s" if count > 1 else "")]
    return " ".join(words)


def prompt_text(include):
    """GenEval convention: a position entry ["left of", j] means *this* object is left of
    include[j]; the prompt names it first ("a circle left of a square")."""
    if len(include) == 2 and "position" in include[1]:
        return f"{_phrase(include[1])} {include[1]['position'][0]} {_phrase(include[0])}"
    return " and ".join(_phrase(e) for e in include)


def _tag(include):
    if any("position" in e for e in include):
        return "position"
    if len(include) == 2:
        return "color_attr" if all(e.get("color") for e in include) else "two_object"
    if include[0]["count"] > 1:
        return "counting"
    return "colors" if include[0].get("color") else "single_object"


def make_metadata(include):
    return {"tag": _tag(include), "include": include, "prompt": prompt_text(include)}


def all_prompts():
    """Every prompt of the world as GenEval-style metadata, in a fixed order."""
    ent = lambda shape, count=1, color=None: {"class": shape, "count": count, **({"color": color} if color else {})}
    out = []
    out += [[ent(s)] for s in SHAPES]                                            # single object
    out += [[ent(a), ent(b)] for a in SHAPES for b in SHAPES if a != b]          # two objects
    out += [[ent(s, n, c)] for s in SHAPES for n in (2, 3, 4) for c in (None, *COLORS)]  # counting
    out += [[ent(s, 1, c)] for s in SHAPES for c in COLORS]                      # colors
    out += [[ent(a), {**ent(b), "position": [r, 0]}]                             # position
            for a in SHAPES for b in SHAPES if a != b for r in ASKED_RELATIONS]
    out += [[ent(a, 1, ca), ent(b, 1, cb)] for a in SHAPES for b in SHAPES if a < b   # color attribution
            for ca in COLORS for cb in COLORS if ca != cb]
    return [make_metadata(inc) for inc in out]


def prompts(split):
    """The fixed split: per category, a seeded 20% of prompts is held out. Held-out prompts
    are never used for pretraining or RL, only for evaluation."""
    assert split in ("train", "heldout"), split
    chosen = []
    for tag in TAGS:
        group = [m for m in all_prompts() if m["tag"] == tag]
        order = list(range(len(group)))
        random.Random(1234).shuffle(order)
        n_held = max(1, round(HELDOUT_FRACTION * len(group)))
        held = set(order[:n_held])
        chosen += [m for i, m in enumerate(group) if (i in held) == (split == "heldout")]
    return chosen


_PHRASE = r"(a|an|one|two|three|four) (?:(red|green|blue|yellow) )?(circle|square|triangle)s?"


def prompt_metadata(prompt):
    """Parse a prompt of this world into GenEval-style metadata; ValueError if it is not one."""
    text = prompt.strip().lower()
    words = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
    ent = lambda m: {"class": m[2], "count": words[m[0]], **({"color": m[1]} if m[1] else {})}
    rel = re.fullmatch(f"{_PHRASE} ({'|'.join(RELATIONS)}) {_PHRASE}", text)
    if rel:
        g = rel.groups()
        return make_metadata([ent(g[4:7]), {**ent(g[0:3]), "position": [g[3], 0]}])
    two = re.fullmatch(f"{_PHRASE} and {_PHRASE}", text)
    if two:
        g = two.groups()
        return make_metadata([ent(g[0:3]), ent(g[3:6])])
    one = re.fullmatch(_PHRASE, text)
    if one:
        return make_metadata([ent(one.groups())])
    raise ValueError(f"not a prompt of the shapes world: {prompt!r} "
                     "(e.g. 'two red circles', 'a square left of a triangle')")


# ----------------------------------------------------------------------------- rendering

# Scenes are a GRID x GRID board of CELL x CELL cells; each cell is empty or holds one object, a
# 6x6 template centred in it (a 1-pixel black margin, so neighbours never touch). An object is
# one cell, so the VAE's 8x downsampling makes it one latent token: the diffusion model then
# composes a 4x4 board of tokens, which a CPU learns in minutes (3,072 pixels took it hours).
TEMPLATES = {
    "square": np.ones((6, 6), bool),
    "circle": np.array([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1],
                        [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]], bool),
    "triangle": np.array([[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0],
                          [0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], bool),
}       # pairwise 12 pixels apart: a detector tells them apart even from a blurry decode


def cell_box(cell):
    """The box (x0, y0, x1, y1) of the object drawn in cell index 0..GRID^2-1 (row-major)."""
    y, x = divmod(cell, GRID)
    return [x * CELL + 1.0, y * CELL + 1.0, x * CELL + 7.0, y * CELL + 7.0]


def _objects(meta, rng):
    """Expand metadata into (shape, colour) objects; unspecified colours are random."""
    objs = []
    for e in meta["include"]:
        for _ in range(e["count"]):
            objs.append((e["class"], e.get("color") or rng.choice(list(COLORS))))
    return objs


def in_halves(relation, subject, reference):
    """Whether cell `subject` lies in the half of the board that `relation` asks and cell
    `reference` in the other half ("left of": columns 0-1 against 2-3)."""
    (rs, cs), (rr, cr), h = divmod(subject, GRID), divmod(reference, GRID), GRID // 2
    return {"left of": cs < h <= cr, "right of": cr < h <= cs, "above": rs < h <= rr, "below": rr < h <= rs}[relation]


def _cells(meta, n, rng, swap=False):
    """n distinct cells for the objects:
      - a counted group (one group of 2-4) fills the board in reading order from the top-left cell,
        so how many cells to fill is all the model must get right: drawn anywhere, the old gate
        model's counts were off by one a quarter of the time after 4,500 steps (0.64), and drawn
        this way counting passes 0.94 after 2,500 (BENCHMARKS.md);
      - a position prompt puts the first object (the reference) and the second (the subject) in the
        asked relation by GenEval's rule (reversed if swap), each in its own half of the board
        (in_halves), so each object's side is a property of the prompt and the cell;
      - anything else goes to distinct cells drawn uniformly."""
    if len(meta["include"]) == 1 and n > 1:
        return list(range(n))                 # a counted group: in reading order (see the docstring)
    pos = meta["include"][-1].get("position")
    while True:
        cells = rng.sample(range(GRID * GRID), n)
        if not pos or n < 2:
            return cells
        subject, reference = (cells[0], cells[1]) if swap else (cells[1], cells[0])
        if (pos[0] in geneval.relative_position(cell_box(subject), cell_box(reference))
                and in_halves(pos[0], subject, reference)):
            return cells


def render(meta, rng, wrong=None):
    """Draw a scene for `meta` as (32, 32, 3) float32 in [0, 1] on black.

    wrong: None (a correct scene) or one of 'missing' (one object left out), 'color'
    (one coloured object in another colour), 'swap' (the relation's sides swapped) to make
    deliberately wrong scenes for the checker's tests."""
    objs = _objects(meta, rng)
    if wrong == "missing":
        objs = objs[:-1]
    if wrong == "color":
        i = next(i for i, e in enumerate(meta["include"]) if e.get("color"))
        first = sum(e["count"] for e in meta["include"][:i])
        shape, color = objs[first]
        objs[first] = (shape, rng.choice([c for c in COLORS if c != color]))
    img = np.zeros((RES, RES, 3), np.float32)
    for (shape, color), cell in zip(objs, _cells(meta, len(objs), rng, swap=wrong == "swap")):
        x0, y0 = (int(v) for v in cell_box(cell)[:2])
        img[y0:y0 + 6, x0:x0 + 6][TEMPLATES[shape]] = COLORS[color]
    return img


def render_batch(metas, seed, wrong=None):
    """(B, 3, 32, 32) float tensor in [0, 1], one scene per metadata (made wrong as render's `wrong` says)."""
    rng = random.Random(seed)
    return torch.from_numpy(np.stack([render(m, rng, wrong) for m in metas])).permute(0, 3, 1, 2)


def random_scenes(n, seed, p_empty=0.6, states=False):
    """(n, 3, 32, 32) boards with each cell independently empty or a random object: what the
    VAE trains on, so it codes every board, not only the prompts' ones. With states=True also
    (n, GRID^2) long: each cell's state, 0 empty, 1 + 4 * shape + colour for an object."""
    rng = np.random.default_rng(seed)
    img = np.zeros((n, RES, RES, 3), np.float32)
    cell_states = np.zeros((n, GRID * GRID), np.int64)
    shapes, colors = list(TEMPLATES.values()), list(COLORS.values())
    for b, cell in zip(*np.nonzero(rng.random((n, GRID * GRID)) > p_empty)):
        x0, y0 = (int(v) for v in cell_box(int(cell))[:2])
        shape, color = rng.integers(3), rng.integers(4)
        img[b, y0:y0 + 6, x0:x0 + 6][shapes[shape]] = colors[color]
        cell_states[b, cell] = 1 + 4 * shape + color
    images = torch.from_numpy(img).permute(0, 3, 1, 2)
    return (images, torch.from_numpy(cell_states)) if states else images


# ----------------------------------------------------------------------------- noisy captions

CORRUPTIONS = ("count", "color", "relation", "omission")


def corrupt(meta, kind, rng):
    """A plausible wrong scene description for a caption, like web alt-text gets wrong: the
    metadata of the scene actually drawn while the caption still says meta["prompt"], or None
    if `kind` does not apply. count: one object more or fewer; color: a named colour changed;
    relation: the relation reversed; omission: the scene holds an object the caption leaves out."""
    inc = [dict(e) for e in meta["include"]]
    if kind == "count":
        if len(inc) != 1:
            return None
        n = inc[0]["count"]
        inc[0]["count"] = rng.choice([c for c in (n - 1, n + 1) if 1 <= c <= 4])
    elif kind == "color":
        named = [e for e in inc if e.get("color")]
        if not named:
            return None
        e = rng.choice(named)
        e["color"] = rng.choice([c for c in COLORS if c != e["color"]])
    elif kind == "relation":
        if "position" not in inc[-1]:
            return None
        r = inc[-1]["position"][0]
        inc[-1]["position"] = [{"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[r], 0]
    elif kind == "omission":
        unasked = [s for s in SHAPES if all(e["class"] != s for e in inc)]   # an extra of an asked shape is a count error
        if sum(e["count"] for e in inc) >= 4 or "position" in inc[-1] or not unasked:
            return None
        extra = {"class": rng.choice(unasked), "count": 1}
        if any(e.get("color") for e in inc):
            extra["color"] = rng.choice(list(COLORS))
        inc.append(extra)
    return {"tag": meta["tag"], "include": inc, "prompt": meta["prompt"]}


def caption_scene(meta, truthful, rng):
    """(the metadata whose scene is drawn, the corruption kind or None) for one pretraining
    example captioned meta["prompt"]: the caption is truthful with probability `truthful`,
    otherwise one applicable corruption, chosen uniformly."""
    if rng.random() < truthful:
        return meta, None
    while True:
        kind = rng.choice(CORRUPTIONS)
        scene = corrupt(meta, kind, rng)
        if scene is not None:
            return scene, kind


# ----------------------------------------------------------------------------- checker


def _cell_pixels(image):
    """Per-cell palette labels of an image (3, H, W) in [0, 1]: (GRID^2, CELL, CELL) int, 0 for
    background, 1..4 for the nearest palette colour of bright pixels close enough to it."""
    rgb = image.permute(1, 2, 0).float().cpu().numpy()
    palette = np.array(list(COLORS.values()), np.float32)                     # (4, 3)
    dist = np.linalg.norm(rgb[:, :, None, :] - palette[None, None], axis=-1)  # (H, W, 4)
    labels = dist.argmin(-1) + 1
    labels[(dist.min(-1) > 0.5) | (rgb.max(-1) < 0.4)] = 0
    return labels.reshape(GRID, CELL, GRID, CELL).transpose(0, 2, 1, 3).reshape(GRID * GRID, CELL, CELL)


def _read_cell(labels, min_area=8):
    """(shape, colour, pixels off the nearest template) of one cell's labels, or None if empty."""
    mask = labels > 0
    if mask.sum() < min_area:
        return None
    color = list(COLORS)[np.bincount(labels[mask], minlength=5)[1:].argmax()]
    off = {}
    for name, t in TEMPLATES.items():
        placed = np.zeros((CELL, CELL), bool)
        placed[1:7, 1:7] = t
        off[name] = int((placed != mask).sum() + (mask & (labels != list(COLORS).index(color) + 1)).sum())
    shape = min(off, key=off.get)
    return shape, color, off[shape]


def detect(image):
    """Objects in one (3, 32, 32) image in [0, 1]: list of dicts (class, color, box, cell).
    Each cell with enough bright palette pixels holds one object: its majority colour, and the
    template nearest (in pixels that differ) to its pixels."""
    objects = []
    for cell, labels in enumerate(_cell_pixels(image)):
        found = _read_cell(labels)
        if found:
            objects.append({"class": found[0], "color": found[1], "box": cell_box(cell), "cell": cell})
    return objects


def well_formed(image, tolerance=4):
    """Whether an image is a board of this world: every cell empty (fewer than 3 stray pixels)
    or one object within `tolerance` pixels of a template in one palette colour."""
    for labels in _cell_pixels(image):
        found = _read_cell(labels, min_area=3)
        if found and found[2] > tolerance:
            return False
    return True


def judge(objects, meta):
    """(strict pass, partial credit in [0, 1]) of detected objects against metadata.

    Strict is GenEval's rule (geneval.verdict) on the world made closed (geneval.closed): every
    described group has exactly its count (in its colour, if named), nothing else is in the scene,
    and the relation holds. Every object read from pixels is certain (score 1), so the objects are
    judged in reading order. Partial credit (the `shapes` reward; not GenEval's) averages, per
    group, 1 - |count error| / count (a quarter of it from the shape alone, so a wrong colour
    still earns something), and the relation (1 if it holds); objects of a shape no group asks
    for scale it down. Each object is charged once: one too many of a requested shape costs its
    group's count credit exactly what one too few does (charged twice until session 8, it pushed
    counting prompts towards too few objects: bench/count_bias.py)."""
    seen = [{**o, "score": 1.0} for o in objects]
    strict, _ = geneval.verdict(seen, geneval.closed(meta, SHAPES), threshold=0.0, counting_threshold=0.0,
                                max_objects=GRID * GRID)
    parts, matched = [], []
    for e in meta["include"]:
        n = e["count"]
        same_shape = [o for o in objects if o["class"] == e["class"]]
        exact = [o for o in same_shape if o["color"] == e.get("color", o["color"])]
        credit = lambda m: max(0.0, 1.0 - abs(m - n) / n)
        parts.append(0.75 * credit(len(exact)) + 0.25 * credit(len(same_shape)))
        matched.append(exact)
    asked = {e["class"] for e in meta["include"]}
    n_unasked = sum(o["class"] not in asked for o in objects)
    pos = meta["include"][-1].get("position")
    if pos:
        subject, reference = matched[-1], matched[pos[1]]
        parts.append(float(bool(subject and reference and
                                pos[0] in geneval.relative_position(subject[0]["box"], reference[0]["box"]))))
    score = sum(parts) / len(parts) / (1.0 + 0.5 * n_unasked)
    return bool(strict), float(score)


def check(images, metadata):
    """Score images (B, 3, H, W) in [0, 1] against GenEval-style metadata.
    Returns strict (B,) bool and score (B,) float32 in [0, 1]."""
    verdicts = [judge(detect(img), meta) for img, meta in zip(images, metadata)]
    strict = torch.tensor([v[0] for v in verdicts], dtype=torch.bool)
    score = torch.tensor([v[1] for v in verdicts], dtype=torch.float32)
    return strict, score


# ----------------------------------------------------------------------------- the base models

MAX_TOKENS = 16


def vocabulary():
    """Every word the world's prompts can use (the tokenizer is trained on this, not on prompts,
    so held-out prompts are never seen)."""
    words = ["a", "an", "and", "of", *NUMBERS.values(), *COLORS, *SHAPES, *(s + "s" for s in SHAPES)]
    words += [w for r in RELATIONS for w in r.split()]
    return sorted(set(words))


def build_tokenizer():
    """A word-level tokenizer trained offline with `tokenizers`, wrapped for transformers."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    tok = Tokenizer(tok_models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = __import__("tokenizers").normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(vocabulary())], trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                   unk_token="[UNK]", model_max_length=MAX_TOKENS)


def build_pipeline(model, vae):
    """A fresh, randomly initialised ShapesPipeline for 'tiny-dit' or 'tiny-unet' around a
    trained autoencoder `vae` (pretrain.py): the denoiser works on its 4x4x4 latents."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    from models import ShapesPipeline
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=64,
        pad_token_id=0, bos_token_id=2, eos_token_id=3))
    side, channels = RES // CELL, vae.config.latent_channels
    if model == "tiny-dit":
        # flow matching on latents: patch 1, so each of the 16 tokens is one cell; 4 joint blocks of width 128
        transformer = SD3Transformer2DModel(
            sample_size=side, patch_size=1, in_channels=channels, out_channels=channels, num_layers=4,
            attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
            caption_projection_dim=128, pooled_projection_dim=64, pos_embed_max_size=side)
        # shift 1: with 16 tokens no resolution-dependent shift is needed (SD3 uses 3 at 1024px)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        return ShapesPipeline(text_encoder, tokenizer, scheduler, vae, transformer=transformer)
    if model == "tiny-unet":
        # 4x4 -> 2x2; at channels (32, 64) it learned this world about half as fast per step (BENCHMARKS.md)
        unet = UNet2DConditionModel(
            sample_size=side, in_channels=channels, out_channels=channels, layers_per_block=1,
            block_out_channels=(64, 128), norm_num_groups=8, cross_attention_dim=64, attention_head_dim=16,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
        # SD1.5's betas and set_alpha_to_one=False, so the last DDIM step keeps a std (~0.03) large
        # enough for its log-prob to recompute to 1e-5 (a cosine schedule leaves ~0.006, and
        # batch-size-dependent conv numerics then move the ratio by 1e-5); trailing spacing, so
        # sampling starts at t = 999 (leading spacing would start SD1.5 at t = 901 for 10 steps)
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
                                  timestep_spacing="trailing")
        return ShapesPipeline(text_encoder, tokenizer, scheduler, vae, unet=unet)
    raise ValueError(model)


# ----------------------------------------------------------------------------- learned rewards of the world

CLIP_CONFIG = {"embed_dim": 64,       # toy-clip / toy-pref: an open_clip CLIP for 32 px boards and the world's words
               "vision_cfg": {"image_size": RES, "patch_size": CELL, "width": 64, "layers": 2, "head_width": 32,
                              "mlp_ratio": 2.0},                                # one token per cell, as the VAE's
               "text_cfg": {"context_length": MAX_TOKENS, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0,
                            "pad_id": 0, "eos_id": 3, "pool_type": "eos"}}      # build_tokenizer's [PAD], [EOS]


def build_clip(config=CLIP_CONFIG):
    """A fresh open_clip CLIP of the built-in world (pretrain.py --model toy-clip trains it): a 2-layer ViT on
    the 32 px board with 8 px patches, one per cell, and a 2-layer text transformer over build_tokenizer's
    words, pooled at [EOS]; images in [0, 1] are centred as (x - 0.5) / 0.5."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    text = dict(config["text_cfg"], vocab_size=len(build_tokenizer()))
    return open_clip.CLIP(config["embed_dim"], CLIPVisionCfg(**config["vision_cfg"]), CLIPTextCfg(**text))


def clip_tokens(prompts, tokenizer=None):
    """(B, MAX_TOKENS) token ids of prompts, as toy-clip reads them."""
    tokenizer = tokenizer or build_tokenizer()
    return tokenizer(list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True,
                     return_tensors="pt").input_ids


def warmth(images):
    """(B,) the share of an image's object pixels that are red or yellow: the simulated rater's taste
    (pretrain.py --model toy-pref), which no prompt of the world asks for."""
    rgb = images.float().cpu()
    lit = rgb.amax(1) > 0.4                                                         # (B, H, W): object pixels
    warm = lit & (rgb[:, 0] > 0.5)                                                   # red and yellow carry red
    return warm.flatten(1).sum(1) / lit.flatten(1).sum(1).clamp(min=1)


def judge_samples(backbone, metas, seeds=(0,), num_steps=10, batch=64, net=None):
    """The checker's verdicts on the deterministic sampler's images of metas x seeds
    (rollout.sample_seeded): strict (S, P) bool and partial credit (S, P)."""
    from rollout import sample_seeded
    images = sample_seeded(backbone, [m["prompt"] for m in metas], seeds, num_steps, batch, net)
    strict, score = check(images, list(metas) * len(seeds))
    return strict.bool().view(len(seeds), len(metas)), score.view(len(seeds), len(metas))


def evaluate(backbone, metas, seeds=(0,), num_steps=10, batch=64, net=None):
    """Strict accuracy and mean partial credit of the deterministic sampler over metas x seeds."""
    strict, score = judge_samples(backbone, metas, seeds, num_steps, batch, net)
    return strict.float().mean().item(), score.mean().item()


def main(argv=None):
    p = cli.Parser(description="The built-in shapes world: evaluate a base model (pretrain.py trains them).")
    sub = p.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("eval", help="held-out strict accuracy of a base model (deterministic sampler)")
    ev.add_argument("--model", default="tiny-dit", help="tiny-dit | tiny-unet | a ShapesPipeline directory")
    ev.add_argument("--steps", type=cli.integer(1), default=10, help="denoising steps")
    ev.add_argument("--seeds", type=cli.integer(1), default=4, help="images per held-out prompt")
    args = p.parse_args(argv)
    from models import load_backbone
    try:
        backbone = load_backbone(args.model)
    except cli.InputError as e:
        p.exit(2, f"error: {e}\n")
    held = prompts("heldout")
    acc, score = evaluate(backbone, held, range(args.seeds), args.steps)
    print(f"{args.model}: held-out strict accuracy {acc:.3f}, partial credit {score:.3f} "
          f"({len(held)} prompts x {args.seeds} seeds, {args.steps} deterministic steps, CFG 1)")


if __name__ == "__main__":
    sys.exit(main())
