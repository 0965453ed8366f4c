"""How much of one update's policy gradient is signal, on the built-in world: the cosine between
policy gradients of independent rollout batches of the base model (ALGORITHM.md section 5).

With g_i = s + n_i (s the true gradient, n_i independent noise of equal size), E cos(g_1, g_2) =
|s|^2 / (|s|^2 + E|n|^2): the signal share of one batch's squared gradient norm. Averaging m
batches divides the noise by m, so an update's gradient is half signal from m = (1 - cos) / cos
batches: batch * (1 - cos) / cos images. The estimator is REINFORCE's, A * grad log pi over a window's
steps, A = the batch-normalised `shapes` reward (a critic with explained variance ~0, as
measured by the ppo_vs_grpo benchmark, gives the same advantage).

Run:  python bench/grad_signal.py                # writes bench/results/grad_signal.json and its BENCHMARKS.md section
"""
import argparse
import copy
import itertools
import sys

import torch

from common import machine, write_json, write_section


def batch_gradient(backbone, net, prompts_pool, n, sde_steps, seed):
    import rollout
    import toy
    g = torch.Generator().manual_seed(seed)
    metas = [prompts_pool[i] for i in torch.randint(len(prompts_pool), (n,), generator=g)]
    traj = rollout.sample(backbone, [m["prompt"] for m in metas], 10, 0.7, generator=g, sde_steps=sde_steps)
    _, R = toy.check(traj.images, metas)                               # (n,) partial credit
    A = (R - R.mean()) / (R.std() + 1e-8)
    net.zero_grad(set_to_none=True)
    for j in range(sde_steps):
        log_prob, _, _ = rollout.recompute_log_prob(backbone, traj, torch.arange(n), torch.full((n,), j), net=net)
        (-(A * log_prob).mean() / sde_steps).backward()
    return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-dit", help="base model")
    p.add_argument("--batch", type=int, default=64, help="trajectories per gradient")
    p.add_argument("--batches", type=int, default=8, help="independent batches (pairs of them are compared)")
    p.add_argument("--sde-steps", type=int, nargs="+", default=[5, 10], help="SDE windows to measure")
    args = p.parse_args()
    import toy
    from models import load_backbone
    backbone = load_backbone(args.model)
    net = copy.deepcopy(backbone.net).requires_grad_(True)       # full weights: every parameter's gradient
    pool = toy.prompts("train")
    results = {}
    for S in args.sde_steps:
        grads = [batch_gradient(backbone, net, pool, args.batch, S, seed) for seed in range(args.batches)]
        cos = [torch.nn.functional.cosine_similarity(a, b, dim=0).item() for a, b in itertools.combinations(grads, 2)]
        mean = sum(cos) / len(cos)
        spread = (sum((c - mean) ** 2 for c in cos) / (len(cos) - 1)) ** 0.5
        results[str(S)] = {"cosines": cos, "mean_cos": mean, "std_cos": spread,
                           "images_for_half_signal": args.batch * (1 - mean) / mean if mean > 0 else float("inf")}
        print(f"sde_steps {S}: cos {', '.join(f'{c:+.3f}' for c in cos)} -> mean {mean:+.3f}", flush=True)
    command = "python bench/grad_signal.py " + " ".join(sys.argv[1:])
    write_json("grad_signal", {"command": command, "model": args.model, "batch": args.batch, "machine": machine(),
                               "results": results})
    lines = [f"Command: `{command}` ({args.model} base model, {args.batch} trajectories per gradient, "
             f"{args.batches} independent batches, all weights)", "",
             "| SDE steps trained | cosine of two batches' policy gradients (mean of pairs) | "
             "images per update for a half-signal gradient (batch (1 - cos) / cos) |", "|---|---|---|"]
    for S, r in results.items():
        need = f"{r['images_for_half_signal']:.0f}" if r["mean_cos"] > 0 else "not measurable: no signal above the noise"
        lines.append(f"| {S} of 10 | {r['mean_cos']:+.3f} (std over pairs {r['std_cos']:.3f}) | {need} |")
    write_section("grad-signal", "## How much of a policy gradient is signal (built-in world)\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
