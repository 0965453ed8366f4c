"""Why RL made the built-in world's policies draw too few objects for counting prompts, and the
`shapes` partial credit's fix (toy.judge; README "where it stands", issue 3 notes).

Until session 8 the partial credit charged one object too many of the asked shape twice: in its
group's count credit (1 - |count error| / count) and again as an extra object (the score divided
by 1 + 0.5 per object beyond the asked total). One too many cost about twice one too few. Now an
object is charged once: a surplus of an asked shape in its group's count credit, only an unasked
shape as an extra. The script measures, with d = objects drawn - objects asked:

  A. the direction each credit pushes: on the base model's training rollouts (train.py's sampler:
     SDE over the 5 noisiest steps), per category, the covariance of d with the reward within
     each prompt (the policy gradient's direction along d); < 0 pushes towards fewer objects
  B. where the policies went: counting's training prompts, deterministic sampler x 8 seeds, for
     the base model and each finished run's pipeline/ (trained on every category, or on counting
     alone with train.py --train-tags counting): strict accuracy, mean d, P(d < 0), P(d > 0)
     (the counting prompts sampled alone: rollout.sample_seeded's noise depends on an image's
     place in the batch, so these images are not those the ppo_vs_grpo sections judge)

Run:  python bench/count_bias.py        # writes bench/results/count_bias.json and its BENCHMARKS.md section
"""
import argparse
import glob
import os

import numpy as np
import torch

from common import ROOT, machine, write_json, write_section

RUN_SETS = {  # label -> glob of run directories (git-ignored; missing ones are skipped)
    "credit until session 8": "bench/runs/ppo_vs_grpo_8x/*-seed*",
    "credit now": "bench/runs/ppo_vs_grpo_8x_credit/*-seed*",
    "credit now, counting prompts only": "bench/runs/counting_only/*-seed*",   # train.py --train-tags counting
}


def old_credit(objects, meta, new):
    """The partial credit as charged until session 8, from today's: every object beyond the
    asked total was an extra, where today only unasked shapes are."""
    shapes = {e["class"] for e in meta["include"]}
    unasked = sum(o["class"] not in shapes for o in objects)
    surplus = max(0, len(objects) - sum(e["count"] for e in meta["include"]))
    return new * (1 + 0.5 * unasked) / (1 + 0.5 * surplus)


@torch.no_grad()
def push(backbone, reps):
    """Part A: per category, within-prompt cov(d, credit) for today's and the old credit."""
    import rollout
    import toy
    out = {}
    for tag in toy.TAGS:
        metas = [m for m in toy.prompts("train") if m["tag"] == tag]
        rows = []                                                        # (prompt, d, credit now, credit before)
        for rep in range(reps):
            traj = rollout.sample(backbone, [m["prompt"] for m in metas], 10, rollout.TRAIN_NOISE[backbone.sampler],
                                  generator=torch.Generator().manual_seed(rep), sde_steps=5)
            for i, (image, meta) in enumerate(zip(traj.images, metas)):
                objects = toy.detect(image)
                new = toy.judge(objects, meta)[1]
                rows.append((i, len(objects) - sum(e["count"] for e in meta["include"]), new, old_credit(objects, meta, new)))
        a = np.array(rows, np.float64)                                   # (P * reps, 4)
        c = a.copy()
        for i in range(len(metas)):                                      # centre within each prompt
            c[a[:, 0] == i, 1:] -= a[a[:, 0] == i, 1:].mean(0)
        out[tag] = {"prompts": len(metas), "mean_d": a[:, 1].mean(), "std_d": c[:, 1].std(),
                    "cov_now": (c[:, 1] * c[:, 2]).mean(), "cov_before": (c[:, 1] * c[:, 3]).mean()}
    return out


@torch.no_grad()
def counting(backbone, seeds):
    """Part B: counting's training prompts under the deterministic sampler."""
    import toy
    from rollout import sample_seeded
    metas = [m for m in toy.prompts("train") if m["tag"] == "counting"]
    images = sample_seeded(backbone, [m["prompt"] for m in metas], seeds, 10)
    d, strict = [], []
    for image, meta in zip(images, metas * len(seeds)):
        objects = toy.detect(image)
        d.append(len(objects) - meta["include"][0]["count"])
        strict.append(toy.judge(objects, meta)[0])
    d = np.array(d)
    return {"strict": float(np.mean(strict)), "mean_d": float(d.mean()), "under": float((d < 0).mean()),
            "over": float((d > 0).mean())}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-dit", help="base model")
    p.add_argument("--reps", type=int, default=8, help="part A: rollouts per training prompt")
    p.add_argument("--seeds", type=int, default=8, help="part B: deterministic samples per prompt")
    args = p.parse_args()
    torch.manual_seed(0)
    from models import load_backbone
    base = load_backbone(args.model)
    a = push(base, args.reps)
    seeds = list(range(args.seeds))
    b = {"base model": counting(base, seeds)}
    for label, pattern in RUN_SETS.items():
        by_algo = {}                                                     # "ppo" / "grpo" -> its seeds' rows
        for run in sorted(glob.glob(os.path.join(ROOT, pattern))):
            if os.path.isdir(os.path.join(run, "pipeline")):
                name = os.path.basename(run)                             # ALGO-seedN
                b[f"{name}, {label}"] = counting(load_backbone(os.path.join(run, "pipeline")), seeds)
                by_algo.setdefault(name.split("-seed")[0], []).append(b[f"{name}, {label}"])
        for algo in ("ppo", "grpo"):                                     # the mean over seeds
            if rows := by_algo.get(algo):
                b[f"**{algo}, mean of {len(rows)} seeds, {label}**"] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    write_json("count_bias", {"machine": machine(), "reps": args.reps, "seeds": seeds, "push": a, "counting": b})
    lines = ["Command: `python bench/count_bias.py`. d = objects drawn - objects asked (all detected objects).", "",
             f"**A. Which way each credit pushes** (base model, training sampler, {args.reps} rollouts per "
             "training prompt; covariance of d and the credit within each prompt: below 0 pushes towards fewer objects)", "",
             "| category | prompts | mean d | within-prompt std of d | cov, credit until session 8 | cov, credit now |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {t} | {r['prompts']} | {r['mean_d']:+.2f} | {r['std_d']:.2f} | {r['cov_before']:+.4f} | {r['cov_now']:+.4f} |"
              for t, r in a.items()]
    lines += ["", f"**B. Where the policies went on counting** (training prompts x {args.seeds} seeds, deterministic "
              "sampler; runs of the 8x sections, trained with the credit named, and of the counting-only section; the counting prompts are sampled alone, so "
              "each image's noise, which depends on its place in the batch, differs from the ppo-vs-grpo sections' and "
              "strict figures differ from theirs by sampling noise)", "",
              "| model | strict | mean d | P(too few) | P(too many) |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {r['strict']:.3f} | {r['mean_d']:+.2f} | {r['under']:.2f} | {r['over']:.2f} |" for m, r in b.items()]
    write_section("count-bias", "## Counting: why RL under-drew, and the credit's fix\n\n" + "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
