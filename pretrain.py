"""Pretraining of the built-in world's models (toy.py): its autoencoder and its two base models.

Nothing here is the paper's method; it makes the situation the method starts from, in miniature:
a *capable* base model whose CFG-free sampling is *misaligned* with its prompts.
  1. `vae`: a diffusers AutoencoderKL that downsamples 8x, so a 32x32 board of 4x4 cells becomes a
     4x4x4 latent (64 numbers, one token per cell), with the scaling and shift factors that make
     the latents unit-variance, as SD's and SD3's VAEs carry.
  2. `tiny-dit` (SD3Transformer2DModel, rectified flow) and `tiny-unet` (UNet2DConditionModel,
     DDPM epsilon): denoisers of those latents, trained from scratch with a tiny CLIP text
     encoder on every prompt of the world (held-out ones too: a real base model has seen
     everything; "held-out" means RL never trains on them, as with GenEval).
  3. Misalignment by noisy captions (`--truthful`), like web alt-text: each pretraining scene is
     captioned truthfully with that probability, otherwise with a plausible corruption
     (toy.caption_scene: a count off by one, a colour changed, a relation reversed, an object
     left out of the caption). The model learns the mixture, so its samples follow the prompt
     about `truthful` of the time, and RL has a correct mode to sharpen. `--truthful 1` is the
     supervised gate: how well the world's model learns from correct captions.

Run (the shipped checkpoints' commands and wall times are in BENCHMARKS.md):
  python pretrain.py --model vae
  python pretrain.py --model tiny-dit --truthful 0.5
Test: tests/test_toy.py (VAE round trip, caption corruption rates).
"""
import json
import math
import os
import random
import sys
import time

import torch

import cli
import toy

VAE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "vae")


def build_vae():
    """A fresh AutoencoderKL: 4 resolutions (3 downsamplings, 32 -> 4), 4 latent channels."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=toy.RES,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
                         mid_block_add_attention=False)


def cell_codes(num_states=13, dim=4, seed=0, iters=2000):
    """A fixed code per cell state (13: empty and 12 objects) in R^dim, spread as far apart as
    they go (pairwise repulsion on the sphere, then centred and scaled to unit variance): the
    targets the VAE's encoder means are pulled to. A VAE trained on pixel MSE alone codes the
    colours (most of the pixel error) 8 units apart and the shapes of one colour 0.45 apart, so
    the denoiser could tell shapes apart only at the lowest noise levels and learned them slowly."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(num_states, dim, generator=g).requires_grad_(True)
    opt = torch.optim.Adam([c], lr=1e-2)
    for _ in range(iters):
        u = c / c.norm(dim=1, keepdim=True)
        d = torch.cdist(u, u) + torch.eye(num_states) * 1e3
        loss = (1 / d ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        u = c / c.norm(dim=1, keepdim=True)
        u = u - u.mean(0)
        return u / u.std()


def pretrain_vae(steps, batch, lr, seed, kl_weight=1e-4, code_weight=1.0, decoder_steps=0, decoder_noise=0.3,
                 init=None):
    """Phase 1 (steps): train the autoencoder on random boards (every cell independently empty
    or an object): pixel MSE (object pixels weighted 5x, they are a fifth of the image), a small
    KL term, and code_weight times the squared distance of each cell's posterior mean to its
    state's fixed code (cell_codes), so that every state is as distinct in the latent as every
    other; then set scaling_factor and shift_factor so encoded boards have mean 0 and std 1.
    Phase 2 (decoder_steps): the encoder (so the latent space) frozen, train the decoder to map
    latents with added Gaussian noise of std decoder_noise (in scaled units) to the clean board,
    so a denoiser's small errors decode to a well-formed board instead of a smudge.
    init: start from this saved autoencoder (its factors are kept when steps is 0)."""
    from diffusers import AutoencoderKL
    from tqdm import tqdm
    torch.manual_seed(seed)
    vae = (AutoencoderKL.from_pretrained(init) if init else build_vae()).train()
    codes = cell_codes()                                                        # (13, 4)
    for phase, n in (("vae", steps), ("decoder", decoder_steps)):
        if n == 0:
            continue
        params = list(vae.parameters()) if phase == "vae" else list(vae.decoder.parameters())
        if phase == "decoder":
            vae.requires_grad_(False).decoder.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / n)))
        bar = tqdm(range(n), desc=f"pretrain {phase}", dynamic_ncols=True)
        for i in bar:
            images, states = toy.random_scenes(batch, seed * 1_000_003 + i + (0 if phase == "vae" else 10 ** 8), states=True)
            x = images * 2 - 1
            if phase == "vae":
                posterior = vae.encode(x).latent_dist
                z = posterior.sample()
                kl = posterior.kl().mean() / posterior.mean[0].numel()
                target = codes[states].view(len(x), toy.GRID, toy.GRID, -1).permute(0, 3, 1, 2)     # (B, 4, 4, 4)
                code_loss = (posterior.mean - target).pow(2).mean()
            else:
                with torch.no_grad():
                    z = vae.encode(x).latent_dist.mode()          # what the denoisers learn (encode())
                z = z + decoder_noise / vae.config.scaling_factor * torch.randn_like(z)
                kl = code_loss = torch.zeros(())
            recon = vae.decode(z).sample
            weight = 1 + 4 * (x > -1).any(1, keepdim=True).float()
            loss = (weight * (recon - x) ** 2).mean() + kl_weight * kl + code_weight * code_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if i % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", code=f"{code_loss.item():.4f}")
        if phase == "vae":
            vae.eval()
            with torch.no_grad():
                z = vae.encode(toy.random_scenes(1024, seed + 1) * 2 - 1).latent_dist.mean
            vae.register_to_config(shift_factor=round(z.mean().item(), 4), scaling_factor=round(1 / z.std().item(), 4))
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, images):
    """Images (B, 3, H, W) in [0, 1] -> scaled latents (B, 4, h, w), as pipelines feed denoisers.
    The posterior's mean, not a sample: its std here is a quarter of the latents' own, noise the
    denoiser would have to learn and reproduce (SD's VAE has a far tighter posterior)."""
    z = vae.encode(images * 2 - 1).latent_dist.mode()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def vae_round_trip(vae, metas, seed=0):
    """Strict pass rate of the checker on decode(encode(render(meta))) for each meta (float)."""
    images = toy.render_batch(metas, seed)
    with torch.no_grad():
        z = vae.encode(images * 2 - 1).latent_dist.mode()
        back = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
    return toy.check(back, metas)[0].float().mean().item()


# Sampling weight of each category in pretraining batches: counting and position are the slow
# ones to learn (BENCHMARKS.md, pretraining curves), so they get twice the others' share.
TAG_WEIGHTS = {"single_object": 1, "two_object": 1, "counting": 2, "colors": 1, "position": 2, "color_attr": 1}


def _batch(metas, rng, n):
    """n prompts, category first (so the large categories do not drown the small), by TAG_WEIGHTS."""
    by_tag = {}
    for m in metas:
        by_tag.setdefault(m["tag"], []).append(m)
    tags = sorted(by_tag)
    return [rng.choice(by_tag[t]) for t in rng.choices(tags, weights=[TAG_WEIGHTS[t] for t in tags], k=n)]


def pretrain(model, steps, batch, lr, seed, vae_dir=VAE_DIR, truthful=1.0, eval_every=0, snapshot=None, curve=None,
             init=None):
    """Train a ShapesPipeline from scratch on VAE latents of rendered scenes of every prompt:
    rectified flow (velocity target, logit-normal sigma, as SD3) for tiny-dit, epsilon-prediction
    DDPM for tiny-unet. The text encoder is trained jointly; 10% of captions are dropped to "" so
    CFG is available. Captions are truthful with probability `truthful` (module docstring, 3).
    Every eval_every steps the EMA weights' held-out accuracy is printed and, if snapshot is a
    directory, the EMA pipeline is saved there (atomically), so a long run can be stopped early;
    if curve is a path, the accuracies so far are written there as JSON (the learning curve).
    init: continue from this saved pipeline (a fresh optimiser and schedule) instead of random weights."""
    from diffusers import AutoencoderKL
    from tqdm import tqdm
    from models import Backbone, denoising_loss
    torch.manual_seed(seed)
    rng = random.Random(seed)
    if init:                                     # continue from a saved pipeline (its own VAE)
        from models import ShapesPipeline
        pipe = ShapesPipeline.from_pretrained(init)
    else:
        pipe = toy.build_pipeline(model, AutoencoderKL.from_pretrained(vae_dir).eval())
    net = pipe.transformer if model == "tiny-dit" else pipe.unet
    net.train().requires_grad_(True), pipe.text_encoder.train().requires_grad_(True)
    params = list(net.parameters()) + list(pipe.text_encoder.parameters())
    # an exponential moving average of the weights is what gets saved (decay warms up to 0.999)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 200) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    every = toy.all_prompts()
    bar = tqdm(range(steps), desc=f"pretrain {model}", dynamic_ncols=True)
    t0, points = time.time(), []
    for i in bar:
        metas = _batch(every, rng, batch)
        scenes = [toy.caption_scene(m, truthful, rng)[0] for m in metas]
        x0 = encode(pipe.vae, toy.render_batch(scenes, seed * 1_000_003 + i))    # (B, 4, 4, 4)
        texts = [m["prompt"] if rng.random() > 0.1 else "" for m in metas]
        ids = pipe.tokenizer(texts, padding="max_length", max_length=toy.MAX_TOKENS, return_tensors="pt").input_ids
        enc = pipe.text_encoder(ids)
        kw = {"encoder_hidden_states": enc.last_hidden_state}
        if model == "tiny-dit":
            kw["pooled_projections"] = enc.text_embeds
        loss = denoising_loss("flow" if model == "tiny-dit" else "ddim", pipe.scheduler, net, x0, kw)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(0.999, (1 + i) / (10 + i)))
        if i % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        last = i + 1 == steps
        if last or (eval_every and (i + 1) % eval_every == 0):
            live = [p.detach().clone() for p in params]
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in params], ema)     # evaluate (and save) the EMA
            if last:
                return pipe
            backbone = Backbone(pipe, model, "cpu", torch.float32)
            held = toy.prompts("heldout")
            strict, score = toy.judge_samples(backbone, held, range(4))              # (S, P)
            by_tag = {tag: strict[:, [m["tag"] == tag for m in held]].float().mean().item() for tag in toy.TAGS}
            points.append({"step": i + 1, "seconds": round(time.time() - t0, 1), "images": (i + 1) * batch,
                           "heldout_strict": strict.float().mean().item(), "heldout_score": score.mean().item(),
                           "by_tag": by_tag})
            bar.write(f"step {i + 1} ({time.time() - t0:.0f}s): held-out strict accuracy {points[-1]['heldout_strict']:.3f}, "
                      f"partial credit {points[-1]['heldout_score']:.3f} (EMA, CFG 1) | "
                      + " ".join(f"{k} {v:.2f}" for k, v in by_tag.items()))
            if curve:
                with open(curve + ".tmp", "w") as f:
                    json.dump({"model": model, "truthful": truthful, "batch": batch, "lr": lr, "seed": seed,
                               "points": points}, f, indent=1)
                os.replace(curve + ".tmp", curve)
            if snapshot:
                save(pipe, snapshot, replace=True)
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in params], live)
            net.train().requires_grad_(True)          # Backbone() froze them for sampling
            pipe.text_encoder.train().requires_grad_(True)


# ----------------------------------------------------------------------------- learned rewards (issue: reward hacking)

def clip_loss(model, images, ids):
    """CLIP's symmetric InfoNCE over a batch of (image, caption) pairs, the i-th caption the i-th image's."""
    image, text, scale = model(images, ids)                                     # unit features, exp(logit scale)
    logits = scale * image @ text.T                                             # (B, B)
    labels = torch.arange(len(images))
    return (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2


def pretrain_clip(steps, batch, lr, seed, truthful=0.5):
    """toy-clip: the world's CLIP (toy.build_clip) trained contrastively from scratch on rendered scenes and
    their *noisy* captions (toy.caption_scene, as the base models were: CLIP learns from alt-text), each batch
    `batch` distinct prompts of the world (so no caption is its batch's negative twice)."""
    from tqdm import tqdm
    torch.manual_seed(seed)
    rng, tokenizer = random.Random(seed), toy.build_tokenizer()
    model = toy.build_clip().train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 100) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    every = toy.all_prompts()
    for i in (bar := tqdm(range(steps), desc="pretrain toy-clip", dynamic_ncols=True)):
        metas = rng.sample(every, min(batch, len(every)))
        scenes = [toy.caption_scene(m, truthful, rng)[0] for m in metas]
        loss = clip_loss(model, (toy.render_batch(scenes, seed * 1_000_003 + i) - 0.5) / 0.5,
                         toy.clip_tokens([m["prompt"] for m in metas], tokenizer))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(), sched.step()
        if i % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def clip_zero_shot(model, scenes_per_prompt=8, seed=0):
    """toy-clip's zero-shot accuracy: each prompt's correctly rendered scenes classified among every prompt of
    the world by cosine; right when the chosen prompt is one the scene satisfies (the checker's strict verdict:
    "two circles" is right for a scene of two red circles). {category: accuracy} and the mean over prompts."""
    every, tokenizer = toy.all_prompts(), toy.build_tokenizer()
    text = model.encode_text(toy.clip_tokens([m["prompt"] for m in every], tokenizer), normalize=True)   # (P, D)
    metas = [m for m in every for _ in range(scenes_per_prompt)]
    images = toy.render_batch(metas, seed)
    chosen = (model.encode_image((images - 0.5) / 0.5, normalize=True) @ text.T).argmax(-1)               # (N,)
    right = toy.check(images, [every[c] for c in chosen.tolist()])[0].float()
    by_tag = {t: right[[m["tag"] == t for m in metas]].mean().item() for t in toy.TAGS}
    return {"mean": right.mean().item(), "by_category": by_tag}


def preference_pairs(n, seed, taste, label_noise, model="tiny-dit"):
    """n pairs of the base model's samples of one training prompt (its training sampler), each labelled by a
    simulated rater: it prefers the image with the higher utility, the checker's partial credit plus `taste`
    x toy.warmth (red and yellow objects: a taste no prompt asks for, as human raters have), and its label
    is flipped with probability label_noise. Returns (images_a, images_b, prompts, a_preferred (n,) bool)."""
    import rollout
    from models import load_backbone
    backbone = load_backbone(model)
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    pool = toy.prompts("train")
    a, b, prompts, label = [], [], [], []
    for start in range(0, n, 64):
        metas = [rng.choice(pool) for _ in range(min(64, n - start))]
        twice = [m for m in metas for _ in range(2)]                                # the pair: adjacent samples
        images = rollout.sample(backbone, [m["prompt"] for m in twice], 10, rollout.TRAIN_NOISE[backbone.sampler],
                                generator=g, sde_steps=5).images
        utility = (toy.check(images, twice)[1] + taste * toy.warmth(images)).view(-1, 2)    # (n, 2)
        prefer = (utility[:, 0] > utility[:, 1]) | ((utility[:, 0] == utility[:, 1]) & (torch.rand(len(metas), generator=g) < 0.5))
        prefer ^= torch.rand(len(metas), generator=g) < label_noise
        a.append(images[0::2]), b.append(images[1::2]), label.append(prefer)
        prompts += [m["prompt"] for m in metas]
    return torch.cat(a), torch.cat(b), prompts, torch.cat(label)


def pretrain_pref(clip_dir, pairs, steps, batch, lr, seed, taste=2.0, label_noise=0.1):
    """toy-pref, in HPS's and PickScore's manner: toy-clip fine-tuned on `pairs` preference pairs
    (preference_pairs; a fifth held out to report) with the Bradley-Terry loss on its scaled cosines,
    -log sigmoid(s(preferred) - s(other)). Returns the model and its held-out pair accuracies."""
    from tqdm import tqdm
    from rewards import load_toy_clip
    torch.manual_seed(seed)
    model, tokenizer = load_toy_clip(clip_dir), toy.build_tokenizer()
    model.train().requires_grad_(True)
    a, b, prompts, prefer = preference_pairs(pairs, seed, taste, label_noise)
    win, lose = torch.where(prefer[:, None, None, None], a, b), torch.where(prefer[:, None, None, None], b, a)
    ids = toy.clip_tokens(prompts, tokenizer)
    held = torch.arange(len(prompts)) % 5 == 4
    train_idx = (~held).nonzero().flatten()

    def score(images, idx):
        image = model.encode_image((images[idx] - 0.5) / 0.5, normalize=True)
        return model.logit_scale.exp() * (image * model.encode_text(ids[idx], normalize=True)).sum(-1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    for i in (bar := tqdm(range(steps), desc="fine-tune toy-pref", dynamic_ncols=True)):
        idx = train_idx[torch.randint(len(train_idx), (batch,), generator=g)]
        loss = -torch.nn.functional.logsigmoid(score(win, idx) - score(lose, idx)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        idx = held.nonzero().flatten()
        agrees = (score(win, idx) > score(lose, idx)).float().mean().item()
    return model, {"pairs": pairs, "held_out_pairs": int(held.sum()), "held_out_agreement_with_rater": agrees,
                   "taste": taste, "label_noise": label_noise}


def save_clip(model, out, info):
    """A toy-clip / toy-pref directory: model.safetensors and config.json (toy.build_clip's config and how it
    was made), written to OUT.tmp and renamed."""
    import shutil
    from safetensors.torch import save_file
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({"config": toy.CLIP_CONFIG, **info}, f, indent=1)
    os.replace(tmp, out)


def save(obj, out, replace=False):
    """save_pretrained to a temporary directory, then rename: a crash leaves no half-written model."""
    import shutil
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    obj.save_pretrained(tmp, safe_serialization=True)
    if replace and os.path.isdir(out):
        shutil.rmtree(out)
    os.replace(tmp, out)


def main(argv=None):
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("vae", "tiny-dit", "tiny-unet", "toy-clip", "toy-pref"), default="tiny-dit",
                   help="what to train: the autoencoder, a base model, or a learned reward of the world (toy-clip: "
                        "a CLIP of noisy captions; toy-pref: toy-clip fine-tuned on a simulated rater's preferences)")
    p.add_argument("--steps", type=cli.integer(0), default=None,
                   help="optimiser steps (default: 2000 vae, 6000 dit/unet, 3000 toy-clip, 1000 toy-pref; 0: a vae "
                        "--init with new factors)")
    p.add_argument("--batch", type=cli.integer(2), default=None,
                   help="scenes per step (default: 64 vae, 128 dit/unet, 108 toy-clip (every prompt once), 64 toy-pref pairs)")
    p.add_argument("--lr", type=cli.finite_float(above=0), default=None,
                   help="AdamW learning rate (default 2e-3 vae, 5e-4 dit/unet, 1e-3 toy-clip, 1e-4 toy-pref)")
    p.add_argument("--pairs", type=cli.integer(10), default=4000,
                   help="toy-pref: preference pairs of the base model's samples (a fifth held out to report)")
    p.add_argument("--taste", type=cli.finite_float(min=0), default=2.0,
                   help="toy-pref: weight of the rater's taste for red and yellow objects (toy.warmth) beside the "
                        "checker's partial credit (2: strong enough that RL on toy-pref alone paints objects warm; "
                        "at 0.5 it is not hacked on average)")
    p.add_argument("--label-noise", type=cli.finite_float(min=0, max=0.5), default=0.1,
                   help="toy-pref: probability that the rater's label is flipped")
    p.add_argument("--seed", type=cli.SEED, default=0, help="seed of weights, scenes and noise")
    p.add_argument("--kl-weight", type=cli.finite_float(min=0), default=1e-4,
                   help="vae: weight of the per-element KL term")
    p.add_argument("--code-weight", type=cli.finite_float(min=0), default=1.0,
                   help="vae: weight of the pull of cell means to their codes")
    p.add_argument("--decoder-steps", type=cli.integer(0), default=1000, help="vae: phase-2 steps hardening the decoder")
    p.add_argument("--decoder-noise", type=cli.finite_float(min=0), default=0.3,
                   help="vae: std of the latent noise in phase 2")
    p.add_argument("--init", type=cli.nonempty, default=None,
                   help="start from this saved autoencoder (vae, e.g. with --steps 0) or pipeline (dit/unet: continue "
                        "with a fresh optimiser and schedule); toy-pref: the toy-clip to fine-tune (default "
                        "checkpoints/toy-clip)")
    p.add_argument("--truthful", type=cli.finite_float(min=0, max=1), default=0.5,
                   help="probability that a pretraining caption is truthful (1 = the supervised gate)")
    p.add_argument("--vae", default=VAE_DIR, help="the autoencoder the denoiser works in (from --model vae)")
    p.add_argument("--eval-every", type=cli.integer(0), default=0,
                   help="print held-out accuracy every N steps (0: only at the end)")
    p.add_argument("--out", type=cli.nonempty, default=None,
                   help="output directory (default: checkpoints/MODEL); never overwritten")
    p.add_argument("--curve", type=cli.output_file(".json"), default=None,
                   help="write the --eval-every accuracies to this JSON file")
    args = p.parse_args(argv)
    if args.steps == 0 and not (args.init and args.model == "vae"):
        p.exit(2, "error: --steps must be >= 1 (0 only for --model vae with --init), got 0\n")
    out = args.out or os.path.join(os.path.dirname(VAE_DIR), args.model)
    if os.path.exists(out):
        p.exit(2, f"error: {out} exists; it is never overwritten (move it away or pass --out)\n")
    blocked = cli.unwritable(out)
    if blocked:
        p.exit(2, f"error: --out {out}: {blocked} is not a writable directory\n")
    if args.model == "toy-pref":
        args.init = args.init or os.path.join(os.path.dirname(VAE_DIR), "toy-clip")
        if not os.path.isfile(os.path.join(args.init, "model.safetensors")):
            p.exit(2, f"error: --init {args.init}: no toy-clip there (run `python pretrain.py --model toy-clip`)\n")
    if args.model in ("toy-clip", "toy-pref"):
        if args.init and args.model == "toy-clip":
            p.exit(2, "error: --init: toy-clip trains from scratch (toy-pref takes --init)\n")
        return train_reward_model(args, out)
    if args.model != "vae" and not os.path.isfile(os.path.join(args.vae, "config.json")):
        p.exit(2, f"error: --vae {args.vae}: no autoencoder there (run `python pretrain.py --model vae`)\n")
    try:                                          # a damaged or mixed-up copy fails here, not after minutes of work
        if args.model != "vae":
            cli.check_component(args.vae, "AutoencoderKL")
        if args.init and args.model == "vae":
            cli.check_component(args.init, "AutoencoderKL")
        elif args.init and cli.check_pipeline(args.init) != "ShapesPipeline":
            raise cli.InputError(f"--init {args.init}: not a ShapesPipeline (a pretrain.py --model {args.model} output)")
        elif args.init:                           # the denoiser it holds must be the one --model trains
            key = "transformer" if args.model == "tiny-dit" else "unet"
            if (cli.read_json(os.path.join(args.init, "model_index.json")).get(key) or [None])[0] is None:
                raise cli.InputError(f"--init {args.init}: holds no {key}, so it is not a --model {args.model} "
                                     f"pipeline (tiny-dit has a transformer, tiny-unet a unet)")
    except cli.InputError as e:
        p.exit(2, f"error: {e}\n")
    args.batch = args.batch or (64 if args.model == "vae" else 128)
    t0 = time.time()
    if args.model == "vae":
        model = pretrain_vae(2000 if args.steps is None else args.steps, args.batch, args.lr or 2e-3, args.seed,
                             kl_weight=args.kl_weight, code_weight=args.code_weight, decoder_steps=args.decoder_steps, decoder_noise=args.decoder_noise, init=args.init)
        print(f"round trip: checker passes {vae_round_trip(model, toy.all_prompts() * 8):.4f} of "
              f"decode(encode(render(prompt))) over every prompt x 8 scenes")
    else:
        model = pretrain(args.model, args.steps or 6000, args.batch, args.lr or 5e-4, args.seed, args.vae,
                         args.truthful, args.eval_every, snapshot=out + ".partial" if args.eval_every else None,
                         curve=args.curve, init=args.init)
    save(model, out)
    print(f"saved {out} after {time.time() - t0:.0f}s")


def train_reward_model(args, out):
    """pretrain.py --model toy-clip / toy-pref: train, report (zero-shot accuracy by category; pair agreement),
    save to out."""
    t0 = time.time()
    if args.model == "toy-clip":
        model = pretrain_clip(args.steps or 3000, args.batch or 108, args.lr or 1e-3, args.seed, args.truthful)
        info = {"kind": "toy-clip", "steps": args.steps or 3000, "truthful": args.truthful, "seed": args.seed}
    else:
        model, info = pretrain_pref(args.init, args.pairs, args.steps or 1000, args.batch or 64, args.lr or 1e-4,
                                    args.seed, args.taste, args.label_noise)
        info = {"kind": "toy-pref", "init": os.path.basename(os.path.normpath(args.init)), **info}
        print(f"held-out pairs: agrees with the rater on {info['held_out_agreement_with_rater']:.3f}")
    info["zero_shot"] = clip_zero_shot(model)
    info["seconds"] = round(time.time() - t0)
    print(f"zero-shot accuracy {info['zero_shot']['mean']:.3f}: "
          + ", ".join(f"{k} {v:.2f}" for k, v in info["zero_shot"]["by_category"].items()))
    save_clip(model, out, info)
    print(f"saved {out} after {info['seconds']}s")


if __name__ == "__main__":
    sys.exit(main())
