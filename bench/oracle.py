"""The control beside every RL figure on the built-in world: what *perfect* data does with the same
update budget. It separates the two reasons an RL run can miss a target: a weak reward signal
(RL's fault) or a budget too small for even perfect supervision to move held-out accuracy that far
(the world's and the budget's).

The shipped base model gets the same LoRA policy adapter as train.py (rank 16 on the attention
projections, AdamW at --lr, cosine decay over the run as train.py's default), trained with its own
pretraining loss (models.denoising_loss) on perfectly rendered scenes of the world's *training*
prompts, --batch scenes per step, as many steps as train.py takes optimiser steps for the same
images (2 per iteration of 32 at the defaults). No reward, no sampling: an oracle, not RL.
Held-out strict accuracy (deterministic sampler, CFG-free, --eval-seeds per prompt) is read every
--every images; several seeds give mean and standard error.

Run:  python bench/oracle.py          # writes bench/results/oracle.json and its BENCHMARKS.md section
"""
import argparse
import math
import random
import sys
import time

import torch

from common import ROOT, machine, write_json, write_section

sys.path.insert(0, ROOT)


def run(model, images, batch, lr, rank, every, eval_seeds, seed, schedule="cosine"):
    """One seed: (held-out strict accuracy every `every` images, the final adapter's strict accuracy on
    the training prompts)."""
    import rollout
    import toy
    from critic import POLICY, adapter, adapter_params, lora_config
    from models import denoising_loss, load_backbone
    from pretrain import encode
    torch.manual_seed(seed)
    rng = random.Random(seed)
    backbone = load_backbone(model)
    backbone.net.add_adapter(lora_config(backbone, rank, 2 * rank), adapter_name=POLICY)
    params = adapter_params(backbone.net, POLICY)
    for p in params:
        p.requires_grad_(True)
    steps = images // batch
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    decay = (lambda i: 0.5 * (1 + math.cos(math.pi * i / steps))) if schedule == "cosine" else (lambda i: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    train, held = toy.prompts("train"), toy.prompts("heldout")

    def heldout_strict(metas=held):
        with torch.no_grad(), adapter(backbone.net, POLICY) as net:
            x = rollout.sample_seeded(backbone, [m["prompt"] for m in metas], range(eval_seeds), 10, batch=64, net=net)
        return toy.check(x, list(metas) * eval_seeds)[0].float().mean().item()

    curve, t0 = [heldout_strict()], time.time()
    for i in range(steps):
        metas = [rng.choice(train) for _ in range(batch)]
        x0 = encode(backbone.pipe.vae, toy.render_batch(metas, seed * 1_000_003 + i))     # (batch, 4, 4, 4)
        with adapter(backbone.net, POLICY) as net:
            loss = denoising_loss(backbone.sampler, backbone.scheduler, net, x0,
                                  backbone.encode([m["prompt"] for m in metas]).cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if ((i + 1) * batch) % every == 0:
            curve.append(heldout_strict())
            print(f"seed {seed}: {(i + 1) * batch} images, held-out strict {curve[-1]:.3f} ({time.time() - t0:.0f}s)",
                  flush=True)
    return curve, heldout_strict(train)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-dit")
    p.add_argument("--images", type=int, default=5120, help="perfect scenes in all (train.py's default run: 160 x 32)")
    p.add_argument("--batch", type=int, default=16, help="scenes per optimiser step (train.py: 2 steps per 32 images)")
    p.add_argument("--lr", type=float, default=1e-3, help="train.py's policy learning rate")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--every", type=int, default=640, help="images between held-out evaluations")
    p.add_argument("--eval-seeds", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine", help="the learning rate over the run")
    p.add_argument("--save", default=None, help="write the first seed's curve to this JSON file and stop (what "
                   "bench/credit.py's perfect-data rows read), instead of this script's own section")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    runs = [run(args.model, args.images, args.batch, args.lr, args.lora_rank, args.every, args.eval_seeds, s,
                args.schedule) for s in args.seeds]
    curves = [curve for curve, _ in runs]                                           # (seeds, points)
    if args.save:
        write_json(args.save.removesuffix(".json"), {"images": [i * args.every for i in range(len(curves[0]))],
                                                     "heldout_strict": curves[0], "train_strict": runs[0][1],
                                                     "config": vars(args)})
        return
    C = torch.tensor(curves)
    mean, se = C.mean(0), C.std(0) / math.sqrt(len(args.seeds)) if len(args.seeds) > 1 else torch.zeros(C.shape[1])
    images = [i * args.every for i in range(C.shape[1])]
    write_json("oracle", {"images": images, "heldout_strict": curves, "config": vars(args), "machine": machine()})
    cmd = "python bench/oracle.py" + ("" if sys.argv[1:] == [] else " " + " ".join(sys.argv[1:]))
    rows = "\n".join(f"| {n:,} | {m:.3f} ± {s:.3f} | {m - mean[0]:+.3f} |" for n, m, s in zip(images, mean.tolist(), se.tolist()))
    write_section("oracle", f"""## The control: perfect data at RL's budget (bench/oracle.py)

`{cmd}` ({len(args.seeds)} seeds, {args.eval_seeds} samples per held-out prompt, {machine()}). The shipped
`{args.model}` with train.py's LoRA policy adapter (rank {args.lora_rank}, lr {args.lr:g}, cosine), trained with
its pretraining loss on perfectly rendered scenes of the *training* prompts, {args.batch} per step:
no reward and no sampling: what the same number of updates does with perfect supervision of the
denoising loss (a reference, not a bound: RL optimises the sampler's outcomes directly and can pass it). Held-out strict accuracy (CFG-free, deterministic sampler), mean ± standard error
over seeds:

| perfect images | held-out strict | gain |
|---|---|---|
{rows}
""")


if __name__ == "__main__":
    main()
