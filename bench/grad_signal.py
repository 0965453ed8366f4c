"""How much of one update's policy gradient is signal, on the built-in world, and how much a
critic could add: the cosine between policy gradients of independent rollout batches of the base
model, with the advantage each algorithm would give (METHOD.md sections 4-5).

With g_i = s + n_i (s the true gradient, n_i independent noise of equal size), E cos(g_1, g_2) =
|s|^2 / (|s|^2 + E|n|^2): the signal share of one batch's squared gradient norm. Averaging m
batches divides the noise by m, so an update's gradient is half signal from m = (1 - cos) / cos
batches: batch * (1 - cos) / cos images. The estimator is A_j * grad log pi(x_{j+1} | x_j) summed
over the SDE window's steps, on the same trajectories for every advantage A, each normalised as
train.py normalises it (GRPO's within groups, the others over the batch's (trajectory, step) pairs):
  batch       R minus the batch mean: REINFORCE, and what critic-PPO gives with a critic at
              explained variance ~0 (as the ppo_vs_grpo benchmark measured)
  group       GRPO's (R - prompt mean) / prompt std over the batch's G samples of each prompt
  oracle-mc   R - V*(x_j), V* = E[R | x_j] estimated by M continuations from each state (a
              perfect critic, GAE lambda = 1)
  oracle-td   V*(x_{j+1}) - V*(x_j) with V*(x_S) = R (a perfect critic, GAE lambda = 0: each
              step credited with the change of value it caused)
  tweedie-td  r(x0-hat_{j+1}) - r(x0-hat_j) with R after the window: the reward of the model's
              one-step clean estimate as a value, no learning (not the paper's critic)
The oracle rows bound what the paper's critic could give here; the learned critic is far from
them (the value-ceiling section). `--reward jpeg` measures DDPO's compressibility reward the same
way: the reward-hacking benchmark's mixture pits it against `shapes`, and what each reward's
gradient carries per update decides which one a weighted sum follows.

Run:  python bench/grad_signal.py                # 64 trajectories per gradient: bench/results/grad_signal.json + BENCHMARKS.md
      python bench/grad_signal.py --prompts 64 --batches 6   # adds the rows for 256 trajectories per gradient
      python bench/grad_signal.py --reward jpeg --advantages batch group   # adds the rows of the jpeg reward
"""
import argparse
import copy
import itertools
import json
import os
import shlex
import sys

import torch

from common import RESULTS, machine, write_json, write_section
from value_ceiling import continue_from

KINDS = ("batch", "group", "oracle-mc", "oracle-td", "tweedie-td")


@torch.no_grad()
def advantages(backbone, traj, metas, R, kinds, G, M, S, generator, score):
    """{kind: A (n, S)} for one batch of n = P * G trajectories (prompt-major), made by train.py's own
    pieces: a value per state through ppo.gae (lambda 1 or 0) then ppo.normalise over the batch's
    (trajectory, step) pairs, or ppo.grpo_advantages (normalised within each group)."""
    import ppo
    import rollout
    n = len(R)
    every_pair = torch.ones(n, S, dtype=torch.bool)
    from_values = lambda V, lam: ppo.normalise(ppo.gae(R[:, None], V[..., None], 1.0, lam)[0][..., 0], every_pair)
    out = {}
    if "batch" in kinds:                   # one value for every state: A = R - const
        out["batch"] = from_values(torch.zeros(n, S), 1.0)
    if "group" in kinds:
        out["group"] = ppo.grpo_advantages(R, G)[:, None].expand(n, S)
    if {"oracle-mc", "oracle-td"} & set(kinds):
        K = traj.log_probs.shape[1]
        schedule, noise_level = backbone.schedule(K), rollout.TRAIN_NOISE[backbone.sampler]
        branch = lambda j: score(continue_from(backbone, traj.latents[:, j].float(), j, traj.cond, schedule, K,
                                               noise_level, S, generator), metas)        # (n,): one continuation each
        V = torch.stack([torch.stack([branch(j) for _ in range(M)]).mean(0) for j in range(S)], 1)   # (n, S): E[R | x_j]
        if "oracle-mc" in kinds:
            out["oracle-mc"] = from_values(V, 1.0)
        if "oracle-td" in kinds:
            out["oracle-td"] = from_values(V, 0.0)
    if "tweedie-td" in kinds:
        T = torch.stack([score(backbone.decode(traj.pred_x0[:, j]), metas) for j in range(S)], 1)   # (n, S)
        out["tweedie-td"] = from_values(T, 0.0)
    return out


def batch_gradients(backbone, net, pool, P, G, M, S, kinds, seed, score):
    """{kind: the policy gradient (all weights, flattened)} of one fresh batch of P prompts x G samples:
    each step's log-probs are computed once and differentiated against every kind's advantages."""
    import rollout
    g = torch.Generator().manual_seed(seed)
    metas = [pool[i] for i in torch.randint(len(pool), (P,), generator=g) for _ in range(G)]
    n = len(metas)
    traj = rollout.sample(backbone, [m["prompt"] for m in metas], 10, rollout.TRAIN_NOISE[backbone.sampler],
                          generator=g, sde_steps=S)
    R = score(traj.images, metas)                                      # (n,)
    A = advantages(backbone, traj, metas, R, kinds, G, M, S, g, score)
    params = list(net.parameters())
    grads = {kind: [torch.zeros_like(q) for q in params] for kind in kinds}
    for j in range(S):
        log_prob, _, _ = rollout.recompute_log_prob(backbone, traj, torch.arange(n), torch.full((n,), j), net=net)
        for i, kind in enumerate(kinds):
            step = torch.autograd.grad(-(A[kind][:, j] * log_prob).mean() / S, params,
                                       retain_graph=i < len(kinds) - 1, allow_unused=True)
            for total, d in zip(grads[kind], step):
                if d is not None:
                    total += d
    return {kind: torch.cat([q.flatten() for q in total]) for kind, total in grads.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-dit", help="base model")
    p.add_argument("--prompts", type=int, default=16, help="prompts P per batch")
    p.add_argument("--samples", type=int, default=4, help="trajectories G per prompt (GRPO's group)")
    p.add_argument("--batches", type=int, default=8, help="independent batches (pairs of them are compared)")
    p.add_argument("--branches", type=int, default=8, help="continuations M per state for the oracle critic")
    p.add_argument("--sde-steps", type=int, default=5, help="the SDE window S (train.py's default on this world)")
    p.add_argument("--reward", default="shapes", choices=("shapes", "jpeg"),
                   help="shapes (the checker's partial credit) | jpeg (minus the JPEG size in kB, DDPO's compressibility)")
    p.add_argument("--advantages", nargs="+", default=list(KINDS), choices=KINDS, help="advantage estimators to compare")
    p.add_argument("--report-only", action="store_true", help="rewrite the BENCHMARKS.md section from the JSON")
    args = p.parse_args()
    if args.report_only:
        saved = json.load(open(os.path.join(RESULTS, "grad_signal.json")))
        return report(saved["model"], saved["runs"])
    if min(args.prompts, args.branches, args.sde_steps) < 1 or args.samples < 2 or args.batches < 3:
        p.exit(2, "error: --prompts, --branches, --sde-steps must be >= 1, --samples >= 2, --batches >= 3\n")
    import rewards
    import toy
    from models import load_backbone
    from tqdm import tqdm
    backbone = load_backbone(args.model)
    net = copy.deepcopy(backbone.net).requires_grad_(True)       # full weights: every parameter's gradient
    reward = rewards.build_reward(args.reward)
    score = lambda images, metas: reward(images, [m["prompt"] for m in metas], metas)
    pool, n = toy.prompts("train"), args.prompts * args.samples
    grads = [batch_gradients(backbone, net, pool, args.prompts, args.samples, args.branches, args.sde_steps,
                             args.advantages, seed, score) for seed in tqdm(range(args.batches), desc="batches")]
    results = {}
    for kind in args.advantages:
        cos = [torch.nn.functional.cosine_similarity(a[kind], b[kind], dim=0).item()
               for a, b in itertools.combinations(grads, 2)]
        mean = sum(cos) / len(cos)
        spread = (sum((c - mean) ** 2 for c in cos) / (len(cos) - 1)) ** 0.5
        results[kind] = {"cosines": cos, "mean_cos": mean, "std_cos": spread,
                         "images_for_half_signal": n * (1 - mean) / mean if mean > 0 else float("inf")}
        print(f"{kind}: mean cos {mean:+.3f} (std over pairs {spread:.3f})", flush=True)
    # one entry per reward and batch size: a run at another --prompts or --reward adds its rows beside
    # the earlier ones, if those were measured the same way (model, window, group, branches); otherwise
    # they are dropped. Entries from before --reward measured shapes and were keyed by size alone.
    path = os.path.join(RESULTS, "grad_signal.json")
    old = json.load(open(path)) if os.path.exists(path) else {}
    same = lambda a: all(a.get(k) == getattr(args, k) for k in ("model", "sde_steps", "samples", "branches"))
    runs = {key(r["args"]): r for r in old.get("runs", {}).values() if same(r["args"])}
    runs[key(vars(args))] = {"command": "python bench/grad_signal.py " + shlex.join(sys.argv[1:]), "args": vars(args),
                             "machine": machine(), "results": results}
    write_json("grad_signal", {"model": args.model, "runs": runs})
    report(args.model, runs)


def key(args):
    """A run's entry in grad_signal.json: its reward and trajectories per gradient."""
    return f"{args.get('reward', 'shapes')} {args['prompts'] * args['samples']}"


def report(model, runs):
    runs = {key(r["args"]): r for r in runs.values()}             # (a JSON from before --reward: keyed by size)
    order = lambda k: (k.split()[0] != "shapes", k.split()[0], int(k.split()[1]))   # shapes first, then by size
    runs = {k: runs[k] for k in sorted(runs, key=order)}
    a = next(iter(runs.values()))["args"]
    lines = [f"{model} base model; SDE window of {a['sde_steps']} of 10 steps; all weights. For each batch size, independent "
             f"batches of training prompts x {a['samples']} trajectories; the advantages on the same trajectories: `batch` R minus the batch "
             "mean (critic-PPO with a critic at explained variance ~0); `group` GRPO's; `oracle-mc` R - E[R | x_j] "
             "(a perfect critic, GAE lambda 1); `oracle-td` E[R | x_j+1] - E[R | x_j] (a perfect critic, lambda 0); "
             "`tweedie-td` the same with r(x0-hat) as the value (no learning). E[R | x_j] is the mean reward of "
             f"{a['branches']} continuations from x_j. 'Not measurable' means a mean within 2 standard errors (std / sqrt(batches)) "
             "of 0.", ""]
    lines += [f"- `{k.split()[0]}` reward, {k.split()[1]} trajectories per gradient: `{r['command']}` ({r['machine']}"
              + ("; the `shapes` credit before session 8, which charged one object too many twice" * ("reward" not in r["args"]))
              + ")" for k, r in runs.items()]
    lines += ["", "| reward | trajectories per gradient | advantage | cosine of two batches' policy gradients (mean of pairs) | "
              "images per update for a half-signal gradient (n (1 - cos) / cos) |", "|---|---|---|---|---|"]
    for k, run in runs.items():
        reward, n = k.split()
        for kind, r in run["results"].items():
            sem = r["std_cos"] / run["args"]["batches"] ** 0.5      # pairs share batches: count batches, not pairs
            need = f"{r['images_for_half_signal']:.0f}" if r["mean_cos"] > 2 * sem else "not measurable"
            lines.append(f"| `{reward}` | {n} | `{kind}` | {r['mean_cos']:+.3f} (std over pairs {r['std_cos']:.3f}) | {need} |")
    write_section("grad-signal", "## How much of a policy gradient is signal, and how much a critic could add (built-in world)\n\n"
                  + "\n".join(lines))

if __name__ == "__main__":
    main()
