"""The built-in shapes world: a 32x32 text-to-image world small enough to train on a CPU.

What it holds (nothing here is from the paper; it stands in for real prompts, images and
GenEval so that the whole method of arXiv 2605.27736 runs on any laptop):
  1. prompts: GenEval's six categories (single object, two objects, counting, colors,
     position, color attribution) over circles/squares/triangles in red/green/blue/yellow,
     with GenEval-style metadata, and a fixed train / held-out split;
  2. render(): draws a scene that satisfies a prompt (the pretraining data);
  3. check(): scores an image against its prompt from pixels alone: GenEval-style strict
     pass/fail and a dense partial credit in [0, 1] (the `shapes` reward);
  4. `python toy.py pretrain --model tiny-dit|tiny-unet`: trains the base model from scratch
     and writes it in diffusers' save_pretrained layout (what `--model tiny-dit` loads).
     `python toy.py eval --model tiny-dit` measures its held-out strict accuracy.

Tests: tests/test_toy.py (checker accuracy on correct and deliberately wrong scenes).
"""
import argparse
import math
import os
import random
import re
import sys
import time

import numpy as np
import torch

from rewards import relative_position      # GenEval's rule, one implementation for both checkers

RES = 32                                   # image side, pixels
SIZE = 4                                   # object side, pixels: one 4x4 patch of the tiny DiT
GRID = 4                                   # objects sit on the patch grid
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0),
          "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}
NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
HELDOUT_FRACTION = 0.2
POSITION_THRESHOLD = 0.1                  # GenEval's relative_position threshold

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
            for a in SHAPES for b in SHAPES if a != b for r in RELATIONS]
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


# Each object is one 4x4 template on the 4-pixel grid, i.e. exactly one patch of the tiny DiT:
# a short pretraining then learns the shapes themselves, and what is left to learn (and to
# fix with RL) is the composition: which patches, how many, in which colours, where.
TEMPLATES = {
    "square": np.ones((4, 4), bool),
    "circle": np.array([[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]], bool),
    "triangle": np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], bool),
}


def _relation_offset(relation, rng):
    """Offset (dx, dy) of the named object from its reference, clearly on one side."""
    along, across = GRID * rng.randint(2, 5), GRID * rng.randint(-1, 1)
    return {"left of": (-along, across), "right of": (along, across),
            "above": (across, -along), "below": (across, along)}[relation]


def _objects(meta, rng):
    """Expand metadata into (shape, colour) objects; unspecified colours are random."""
    objs = []
    for e in meta["include"]:
        for _ in range(e["count"]):
            objs.append((e["class"], e.get("color") or rng.choice(list(COLORS))))
    return objs


def render(meta, rng, wrong=None):
    """Draw a scene for `meta` as (32, 32, 3) float32 in [0, 1] on black.

    wrong: None (a correct scene) or one of 'missing' (one object left out), 'color'
    (one coloured object in another colour), 'swap' (the relation's sides swapped) to make
    deliberately wrong scenes for the checker's tests."""
    objs = _objects(meta, rng)
    pos = meta["include"][-1].get("position")
    if wrong == "missing":
        objs = objs[:-1]
    if wrong == "color":
        i = next(i for i, e in enumerate(meta["include"]) if e.get("color"))
        first = sum(e["count"] for e in meta["include"][:i])
        shape, color = objs[first]
        objs[first] = (shape, rng.choice([c for c in COLORS if c != color]))
    for _ in range(1000):
        corners = []
        if pos:
            dx, dy = _relation_offset(pos[0], rng)
            if wrong == "swap":
                dx, dy = -dx, -dy
            x0 = GRID * rng.randint(max(0, -dx) // GRID, (RES - SIZE - max(0, dx)) // GRID)
            y0 = GRID * rng.randint(max(0, -dy) // GRID, (RES - SIZE - max(0, dy)) // GRID)
            corners = [(x0, y0), (x0 + dx, y0 + dy)]
        else:
            for _ in objs:
                corners.append((GRID * rng.randint(0, (RES - SIZE) // GRID), GRID * rng.randint(0, (RES - SIZE) // GRID)))
        # objects on the patch grid (so a 4x4-patch DiT learns them in minutes), a grid cell
        # apart (so connected components separate them)
        if all(max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= SIZE + GRID
               for i, a in enumerate(corners) for b in corners[i + 1:]):
            break
    else:
        raise RuntimeError(f"could not place {meta['prompt']!r}")
    img = np.zeros((RES, RES, 3), np.float32)
    for (shape, color), (x, y) in zip(objs, corners):
        img[y:y + SIZE, x:x + SIZE][TEMPLATES[shape]] = COLORS[color]
    return img


def render_batch(metas, seed):
    """(B, 3, 32, 32) float tensor in [0, 1], one scene per metadata."""
    rng = random.Random(seed)
    return torch.from_numpy(np.stack([render(m, rng) for m in metas])).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- checker


def _components(labels):
    """4-connected components of equal non-zero labels in a (H, W) int array, by label
    propagation (each pixel takes the max id of its same-label neighbours until stable)."""
    h, w = labels.shape
    ids = np.where(labels > 0, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        p = np.pad(ids, 1)
        lp = np.pad(labels, 1)
        new = ids.copy()
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            nb = p[dy:dy + h, dx:dx + w]
            same = lp[dy:dy + h, dx:dx + w] == labels
            new = np.where(same & (labels > 0), np.maximum(new, nb), new)
        if (new == ids).all():
            return ids
        ids = new


def detect(image, min_area=5):
    """Objects in one (3, H, W) image in [0, 1]: list of dicts (class, color, box, area).

    Each pixel takes the nearest palette colour if it is bright and close enough to it,
    else background; a 4-connected blob of one colour is an object; its shape is the
    template nearest (in pixels that differ) to the blob's 4x4 box."""
    rgb = image.permute(1, 2, 0).float().cpu().numpy()
    palette = np.array(list(COLORS.values()), np.float32)                   # (4, 3)
    dist = np.linalg.norm(rgb[:, :, None, :] - palette[None, None], axis=-1)  # (H, W, 4)
    labels = dist.argmin(-1) + 1
    labels[(dist.min(-1) > 0.5) | (rgb.max(-1) < 0.4)] = 0
    ids = _components(labels)
    objects = []
    names = list(COLORS)
    for i in np.unique(ids[ids > 0]):
        ys, xs = np.nonzero(ids == i)
        if len(xs) < min_area:
            continue
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        blob = np.zeros((SIZE, SIZE), bool)                 # the top-left 4x4 of the blob's box
        inside = (xs - x0 < SIZE) & (ys - y0 < SIZE)
        blob[ys[inside] - y0, xs[inside] - x0] = True
        shape = min(TEMPLATES, key=lambda k: (TEMPLATES[k] != blob).sum())
        objects.append({"class": shape, "color": names[labels[ys[0], xs[0]] - 1],
                        "box": [float(x0), float(y0), float(x1), float(y1)], "area": len(xs)})
    return objects


def judge(objects, meta):
    """(strict pass, partial credit in [0, 1]) of detected objects against metadata.

    Strict: every described group has exactly its count (in its colour, if named), nothing
    else is in the scene, and the relation holds. Partial credit averages, per group,
    1 - |count error| / count (a quarter of it from the shape alone, so a wrong colour
    still earns something), and the relation (1 if it holds); objects of a shape no group
    asks for scale it down. Each object is charged once: one too many of a requested shape
    costs its group's count credit exactly what one too few does. (Until session 8 it was
    also charged as an extra object, so it cost about twice as much, and the credit itself
    pushed counting prompts towards too few objects: bench/count_bias.py.)"""
    parts, strict = [], True
    matched = []
    for e in meta["include"]:
        n = e["count"]
        same_shape = [o for o in objects if o["class"] == e["class"]]
        exact = [o for o in same_shape if o["color"] == e.get("color", o["color"])]
        strict &= len(exact) == n
        credit = lambda m: max(0.0, 1.0 - abs(m - n) / n)
        parts.append(0.75 * credit(len(exact)) + 0.25 * credit(len(same_shape)))
        matched.append(exact)
    strict &= len(objects) == sum(e["count"] for e in meta["include"])   # nothing else in the scene
    asked = {e["class"] for e in meta["include"]}
    n_unasked = sum(o["class"] not in asked for o in objects)
    pos = meta["include"][-1].get("position")
    if pos:
        subject, reference = matched[-1], matched[pos[1]]
        holds = bool(subject and reference and
                     pos[0] in relative_position(subject[0]["box"], reference[0]["box"], POSITION_THRESHOLD))
        strict &= holds
        parts.append(float(holds))
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


def build_pipeline(model):
    """A fresh, randomly initialised ShapesPipeline for 'tiny-dit' or 'tiny-unet'."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    from models import ShapesPipeline
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=64,
        pad_token_id=0, bos_token_id=2, eos_token_id=3))
    if model == "tiny-dit":
        # flow matching in pixel space: 8x8 patches of 4x4 pixels, 4 joint blocks of width 128
        transformer = SD3Transformer2DModel(
            sample_size=RES, patch_size=4, in_channels=3, out_channels=3, num_layers=4,
            attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
            caption_projection_dim=128, pooled_projection_dim=64, pos_embed_max_size=RES // 4)
        # shift 1: at 32x32 pixels no resolution-dependent shift is needed (SD3 uses 3 at 1024px)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        return ShapesPipeline(text_encoder, tokenizer, scheduler, transformer=transformer)
    if model == "tiny-unet":
        unet = UNet2DConditionModel(
            sample_size=RES, in_channels=3, out_channels=3, layers_per_block=1,
            block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=64,
            attention_head_dim=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
        # SD1.5's betas and set_alpha_to_one=False, so the last DDIM step keeps a std (~0.03) large
        # enough for its log-prob to recompute to 1e-5 (a cosine schedule leaves ~0.006, and
        # batch-size-dependent conv numerics then move the ratio by 1e-5); trailing spacing, so
        # sampling starts at t = 999 (leading spacing would start SD1.5 at t = 901 for 10 steps)
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
                                  timestep_spacing="trailing")
        return ShapesPipeline(text_encoder, tokenizer, scheduler, unet=unet)
    raise ValueError(model)


def _batch(train, rng, n):
    """n training prompts, category first (so the large categories do not drown the small)."""
    by_tag = {}
    for m in train:
        by_tag.setdefault(m["tag"], []).append(m)
    return [rng.choice(by_tag[rng.choice(sorted(by_tag))]) for _ in range(n)]


def ddpm_timestep_like(alphas_cumprod, sigma):
    """The DDPM timestep whose signal-to-noise ratio abar / (1 - abar) is nearest to that of the
    flow-matching state (1 - sigma) x0 + sigma noise, ((1 - sigma) / sigma)^2. (B,) long."""
    snr_t = alphas_cumprod / (1 - alphas_cumprod)                                      # (T,)
    snr = ((1 - sigma) / sigma).pow(2)                                                 # (B,)
    return (snr_t[None] - snr[:, None]).abs().argmin(1)


def pretrain(model, steps, batch, lr, seed, log_every=100, eval_every=0, object_weight=5.0, init=None):
    """Train a ShapesPipeline from scratch on rendered scenes of training prompts: rectified
    flow (velocity target, logit-normal sigma, as SD3) for tiny-dit, epsilon-prediction DDPM
    for tiny-unet. The text encoder is trained jointly; 10% of prompts are dropped to "" so
    CFG is available."""
    from tqdm import tqdm
    torch.manual_seed(seed)
    rng = random.Random(seed)
    if init:                                         # continue from a saved pipeline (stage 2)
        from models import ShapesPipeline
        pipe = ShapesPipeline.from_pretrained(init)
    else:
        pipe = build_pipeline(model)
    net = pipe.transformer if model == "tiny-dit" else pipe.unet
    net.train().requires_grad_(True), pipe.text_encoder.train().requires_grad_(True)
    params = list(net.parameters()) + list(pipe.text_encoder.parameters())
    # an exponential moving average of the weights is what gets saved: in a run this short it
    # gives far cleaner samples than the last iterate (decay warms up from 0 to 0.995)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 100) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    train = prompts("train")
    abar = pipe.scheduler.alphas_cumprod if model == "tiny-unet" else None
    bar = tqdm(range(steps), desc=f"pretrain {model}", dynamic_ncols=True)
    for i in bar:
        metas = _batch(train, rng, batch)
        x0 = render_batch(metas, seed * 1_000_003 + i) * 2 - 1                 # (B, 3, 32, 32) in [-1, 1]
        texts = [m["prompt"] if rng.random() > 0.1 else "" for m in metas]
        ids = pipe.tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
        enc = pipe.text_encoder(ids)
        noise = torch.randn_like(x0)
        if model == "tiny-dit":
            sigma = torch.sigmoid(torch.randn(batch) + 1.0)                     # logit-normal, mean 1
            x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
            pred = net(x_t, timestep=sigma * 1000, encoder_hidden_states=enc.last_hidden_state,
                       pooled_projections=enc.text_embeds, return_dict=False)[0]
            target = noise - x0
        else:
            # the DiT's logit-normal noise levels, carried over by signal-to-noise ratio: uniform t
            # spends most steps at low noise, where the composition is already decided
            t = ddpm_timestep_like(abar, torch.sigmoid(torch.randn(batch) + 1.0))
            a = abar[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            pred = net(x_t, timestep=t, encoder_hidden_states=enc.last_hidden_state, return_dict=False)[0]
            target = noise
        # objects are 1-5% of the pixels: weighted as they are, a few thousand CPU steps learn the
        # black background and the shapes but hardly the prompt (the loss with shuffled prompts
        # was within 3% of the right ones). Stage 1 weighs object pixels object_weight times, and
        # sigma leans to the noisy end (logit-normal mean 1), where the composition is decided;
        # the weighting biases the model to too many objects, so a short stage 2 at weight 1
        # (--init, --object-weight 1) recalibrates it.
        weight = 1 + (object_weight - 1) * (x0 > 0).any(1, keepdim=True).float()
        loss = (weight * (pred - target).pow(2)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(0.995, (1 + i) / (10 + i)))
        if i % log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if eval_every and (i + 1) % eval_every == 0 or i + 1 == steps:
            live = [p.detach().clone() for p in params]
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in params], ema)     # evaluate (and save) the EMA
            if i + 1 == steps:
                return pipe
            from models import Backbone
            acc, score = evaluate(Backbone(pipe, model, "cpu", torch.float32), prompts("heldout"), range(2))
            bar.write(f"step {i + 1}: held-out strict accuracy {acc:.3f}, partial credit {score:.3f} (EMA)")
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in params], live)
            net.train().requires_grad_(True)          # Backbone() froze them for sampling
            pipe.text_encoder.train().requires_grad_(True)


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
    p = argparse.ArgumentParser(description="The built-in shapes world: pretrain or evaluate its base models.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pt = sub.add_parser("pretrain", help="train tiny-dit or tiny-unet from scratch and save it")
    pt.add_argument("--model", choices=("tiny-dit", "tiny-unet"), default="tiny-dit", help="which base model")
    pt.add_argument("--steps", type=int, default=None, help="optimiser steps (default: 1500 dit, 600 unet)")
    pt.add_argument("--batch", type=int, default=64, help="scenes per step")
    pt.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine decay, 100 warm-up steps)")
    pt.add_argument("--seed", type=int, default=0, help="seed of weights, scenes and noise")
    pt.add_argument("--object-weight", type=float, default=5.0, help="loss weight of object pixels (1 = plain MSE)")
    pt.add_argument("--init", default=None, help="start from this saved pipeline instead of random weights")
    pt.add_argument("--eval-every", type=int, default=0, help="print held-out accuracy every N steps (0: only at the end)")
    pt.add_argument("--out", default=None, help="output directory (default: checkpoints/MODEL); never overwritten")
    ev = sub.add_parser("eval", help="held-out strict accuracy of a base model (deterministic sampler)")
    ev.add_argument("--model", default="tiny-dit", help="tiny-dit | tiny-unet | a ShapesPipeline directory")
    ev.add_argument("--steps", type=int, default=10, help="denoising steps")
    ev.add_argument("--seeds", type=int, default=4, help="images per held-out prompt")
    args = p.parse_args(argv)
    from models import MODELS, BackboneError, load_backbone
    if args.cmd == "pretrain":
        out = args.out or MODELS[args.model]
        if os.path.exists(out):
            p.exit(2, f"error: {out} exists; it is never overwritten (move it away or pass --out)\n")
        steps = args.steps or (1500 if args.model == "tiny-dit" else 600)
        t0 = time.time()
        pipe = pretrain(args.model, steps, args.batch, args.lr, args.seed, eval_every=args.eval_every,
                        object_weight=args.object_weight, init=args.init)
        tmp = out + ".tmp"
        pipe.save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, out)                      # atomic: a crash leaves no half-written checkpoint
        print(f"saved {out} after {steps} steps in {time.time() - t0:.0f}s")
        args.model = out
    try:
        backbone = load_backbone(args.model)
    except BackboneError as e:
        p.exit(2, f"error: {e}\n")
    nsteps = getattr(args, "steps", 10) if args.cmd == "eval" else 10
    seeds = range(getattr(args, "seeds", 4))
    acc, score = evaluate(backbone, prompts("heldout"), seeds, nsteps)
    print(f"{args.model}: held-out strict accuracy {acc:.3f}, partial credit {score:.3f} "
          f"({len(prompts('heldout'))} prompts x {len(seeds)} seeds, {nsteps} deterministic steps)")


if __name__ == "__main__":
    sys.exit(main())
