"""Why a learned critic does or does not help the RL update: a finished train.py run's critic, read
against fresh rollouts of that run's final policy and against its own replay (METHOD.md 4).

For each run (a bench/credit.py run directory, or any train.py run with a learned critic on the
built-in world), N fresh rollouts of the final policy on training prompts, the training sampler
(its SDE window and noise level), the return R normalised with the run's own running statistics,
as its critic's targets were. Per state of the window (and x_(t_1) where the head learned it):
  ev     1 - Var(R - V) / Var(R): what A = R - V removes from the advantage's variance (negative:
         the baseline adds variance)
  corr   the correlation of V and R: what the critic knows, whatever its scale (corr^2 is the EV a
         rescaled V would reach)
  beta   Cov(R, V) / Var(V), the slope of R on V: 1 is calibrated, < 1 overconfident (V spreads
         more than what it knows warrants)
With --critic-replay, also the head's fit on the states it kept (the newest and the oldest 4
iterations in its buffer): the oldest ones it has taken ~M passes over. A high fit there beside a
low one on fresh rollouts is memorisation of the returns' noise.

Run:  python bench/critic_health.py --runs bench/runs/credit_tiny-dit/fitted-critic-l1-seed0 ...
Writes bench/results/critic_health.json and the BENCHMARKS.md section critic-health.
"""
import argparse
import json
import os
import random
import shlex
import sys

import torch

from common import ROOT, machine, write_json, write_section


def stats(V, R):
    """ev, corr, beta of predictions V against targets R (1-D)."""
    V, R = V.double(), R.double()
    cov = ((V - V.mean()) * (R - R.mean())).mean()
    var_v, var_r = V.var(unbiased=False), R.var(unbiased=False)
    return {"ev": (1 - (R - V).var(unbiased=False) / var_r).item(), "corr": (cov / (var_v * var_r).sqrt()).item(),
            "beta": (cov / var_v).item() if var_v > 0 else float("nan"), "sd_v": var_v.sqrt().item(),
            "sd_r": var_r.sqrt().item()}


def health(run, rollouts, seed):
    import critic as critic_module
    import rollout
    import toy
    from models import load_backbone
    from safetensors.torch import load_file
    config = json.load(open(os.path.join(run, "config.json")))
    if config.get("rewards") != "shapes":
        raise SystemExit(f"{run}: trained on {config.get('rewards')}; this reads critics of the shapes reward")
    policy = load_backbone(os.path.join(run, "pipeline"))           # the final policy, as exported
    base = load_backbone(config["model"])                           # the critic's own copy of the base
    critic = critic_module.load(base, run).eval()
    mixer = torch.load(os.path.join(run, "checkpoint", "state.pt"), weights_only=True)["mixer"]
    mean, std = mixer["shapes/mean"].item(), (mixer["shapes/m2"] / mixer["shapes/count"]).sqrt().item()
    K, terminal = config["sde_steps"], bool(config.get("critic_terminal"))
    noise = config["noise_level"] if config.get("noise_level") is not None else rollout.TRAIN_NOISE[policy.sampler]
    pool, rng, g = toy.prompts("train"), random.Random(seed), torch.Generator().manual_seed(seed)
    V, R = [], []
    with torch.no_grad():
        for _ in range(0, rollouts, 32):
            metas = [rng.choice(pool) for _ in range(32)]
            traj = rollout.sample(policy, [m["prompt"] for m in metas], config["num_steps"], noise, config["cfg"],
                                  generator=g, sde_steps=K, metas=metas)
            _, score = toy.check(traj.images.float().cpu(), metas)
            R.append((score.double() - mean) / std)                                       # (B,)
            V.append(critic.values(base, traj, steps=K, last=terminal)[..., 0].double().cpu())   # (B, F)
    V, R = torch.cat(V), torch.cat(R)
    out = {"config": {k: config.get(k) for k in ("critic_replay", "critic_head_lr", "critic_terminal", "critic_text",
                                                  "gae_lambda", "seed")},
           "fresh": [stats(V[:, f], R) for f in range(V.shape[1])], "rollouts": len(R)}
    replay_path = os.path.join(run, "checkpoint", "replay_rank0.safetensors")
    if os.path.isfile(replay_path):
        kept = load_file(replay_path)                     # "i.j": tensor j of the i-th kept iteration, oldest first
        n, F, B = len({k.split(".")[0] for k in kept}), K + 1 if terminal else K, config["batch_size"]
        for label, its in (("replay_newest4", range(max(0, n - 4), n)), ("replay_oldest4", range(min(4, n)))):
            cols = [([], []) for _ in range(F)]                # (values, returns) of each state f
            for i in its:
                parts = [kept[f"{i}.{j}"] for j in range(sum(k.startswith(f"{i}.") for k in kept))]
                *inputs, returns, _ = parts
                with torch.no_grad():
                    v, r = critic.head(*inputs)[:, 0].double(), returns[:, 0].double()
                # a batch kept whole has B * F rows, b*F + f; with --critic-replay-states last an earlier
                # batch keeps its x_(t_1) rows alone, B of them
                whole = len(r) == B * F
                for f in (range(F) if whole else [F - 1]):
                    cols[f][0].append(v[f::F] if whole else v), cols[f][1].append(r[f::F] if whole else r)
            out[label] = [stats(torch.cat(v), torch.cat(r)) if v else None for v, r in cols]
        out["replay_iterations"] = n
    out["window"], out["terminal"] = K, terminal
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="finished train.py run directories (learned critic, shapes)")
    p.add_argument("--rollouts", type=int, default=256, help="fresh rollouts of each run's final policy")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    missing = [r for r in args.runs if not os.path.isdir(os.path.join(r, "pipeline"))]
    if missing:
        p.exit(2, f"error: not a finished run (no pipeline/): {', '.join(missing)}\n")
    results = {os.path.basename(os.path.normpath(r)): health(r, args.rollouts, args.seed) for r in args.runs}
    command = "python bench/critic_health.py " + shlex.join(sys.argv[1:])
    write_json(os.path.join(ROOT, "bench", "results", "critic_health"),
               {"command": command, "machine": machine(), "runs": results})
    S = max(h["window"] for h in results.values())
    lines = ["## The learned critic's health: fresh rollouts against its own replay", "",
             f"Command: `{command}` ({args.rollouts} fresh rollouts of each run's final policy on training prompts, the "
             "training sampler; R normalised with the run's running statistics). Each cell: ev / corr / beta (module "
             "docstring) at one state: the SDE window's states (state 0 = pure noise), then x_(t_1) where the head "
             "learned it; '-' where the run has no such state or did not keep it.", "",
             "| run | where | " + " | ".join(f"window state {f}" for f in range(S)) + " | x_(t_1) |",
             "|---|---|" + "---|" * (S + 1)]
    cell = lambda s: "-" if s is None else f"{s['ev']:+.2f} / {s['corr']:+.2f} / {s['beta']:.2f}"
    for name, h in results.items():
        for where in ("fresh", "replay_newest4", "replay_oldest4"):
            if where in h:
                K, states = h["window"], h[where]
                cells = [cell(s) for s in states[:K]] + ["-"] * (S - K) + [cell(states[K]) if h["terminal"] else "-"]
                label = {"fresh": "fresh rollouts", "replay_newest4": "its replay, newest 4 iterations",
                         "replay_oldest4": f"its replay, oldest 4 of {h.get('replay_iterations')}"}[where]
                lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    write_section("critic-health", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
