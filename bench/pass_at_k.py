"""How far RL can go by sharpening alone on the built-in world: the base model's pass@k per prompt.

RL on a sparse pass/fail reward mostly moves probability toward samples the base model already
draws. A prompt the base model never gets right in k samples gives the policy gradient nothing
to move toward, so the share of prompts with pass@k > 0 bounds what sharpening alone reaches.
For each prompt: k samples of the deterministic sampler (seeds 0..k-1), judged by `toy.check`;
reported per split and per GenEval category: mean accuracy, pass@1/4/k (unbiased estimator of
Chen et al. 2021 from the k samples) and the share of prompts never passed.

Run:  python bench/pass_at_k.py                 # writes bench/results/pass_at_k.json and its BENCHMARKS.md section
"""
import argparse
import collections
import math
import random

import torch

from common import machine, write_json, write_section


def pass_at(n, c, k):
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarise(ok, ks):
    c = ok.sum(1).tolist()
    n = ok.shape[1]
    return {"prompts": len(c), "accuracy": ok.float().mean().item(),
            **{f"pass@{k}": sum(pass_at(n, ci, k) for ci in c) / len(c) for k in ks},
            "never_passed": sum(ci == 0 for ci in c) / len(c)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-dit", help="base model")
    p.add_argument("--k", type=int, default=16, help="samples per prompt")
    p.add_argument("--train-prompts", type=int, default=100, help="training prompts to sample (all held-out ones are used)")
    p.add_argument("--num-steps", type=int, default=10, help="deterministic denoising steps")
    args = p.parse_args()
    import models
    import toy
    backbone = models.load_backbone(args.model, "cpu", torch.float32)
    ks = sorted({1, 4, args.k})
    train = toy.prompts("train")
    splits = {"held-out": toy.prompts("heldout"), "train": random.Random(0).sample(train, min(args.train_prompts, len(train)))}
    results = {}
    for name, metas in splits.items():
        ok = toy.judge_samples(backbone, metas, range(args.k), args.num_steps)[0].T         # (P, k)
        tags = collections.defaultdict(list)
        for i, m in enumerate(metas):
            tags[m["tag"]].append(i)
        results[name] = {"all": summarise(ok, ks), **{t: summarise(ok[idx], ks) for t, idx in sorted(tags.items())}}
        print(name, results[name]["all"], flush=True)
    command = f"python bench/pass_at_k.py --model {args.model} --k {args.k} --train-prompts {args.train_prompts}"
    write_json("pass_at_k", {"command": command, "machine": machine(), "results": results})
    cols = ["accuracy", *[f"pass@{k}" for k in ks if k > 1], "never_passed"]
    lines = [f"Command: `{command}` ({machine()}). Each prompt: {args.k} samples of the deterministic sampler, "
             f"{args.num_steps} steps, seeds 0..{args.k - 1}, strict `toy.check`; pass@k by the unbiased estimator "
             "from those samples.", "",
             "| split / category | prompts | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, rows in results.items():
        for tag, r in rows.items():
            label = f"**{name}**" if tag == "all" else f"{name} / {tag}"
            lines.append(f"| {label} | {r['prompts']} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |")
    h = results["held-out"]["all"]
    lines += ["", f"A held-out prompt the base model never passes in {args.k} samples ({h['never_passed']:.0%} of them) "
              "gives a pass/fail policy gradient nothing to sharpen toward; sharpening alone tops out near "
              f"pass@{args.k} = {h[f'pass@{args.k}']:.2f} on held-out prompts unless RL also teaches the model "
              "something new (for the held-out prompts, by generalising from the training ones)."]
    write_section("pass-at-k", f"## How far sharpening alone can go: pass@k of the base model ({args.model})\n\n"
                  + "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
