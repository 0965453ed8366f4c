"""How predictable is the return from a noisy latent, in principle and in practice? The paper's
premise (METHOD.md section 3) on the built-in world, state by state along the SDE window.

For N base-model trajectories (P training prompts x G samples each) and each state x_j of the
window (j = 0 is pure noise, j = S the first state after the window, from which the rest of the
sampler is deterministic), M continuations are sampled from x_j with the same sampler. Their
rewards R_jm give, against the same targets, the explained variance 1 - Var(R - f(x_j)) / Var(R) of:
  ceiling          f = E[R | x_j], estimated by the M continuations: what a perfect critic reaches
                   (1 - mean within-state variance / total variance)
  learned critic   f = V_phi(x_j), critic.fit on --fit-iters fresh batches of the same prompts,
                   as train.py --critic-fraction 1 trains it (backbone copy and head, each batch once)
  r(x0-hat)        f = a + b * r(decode(x0-hat_j)), the reward of the model's own one-step
                   estimate of the clean image (Tweedie), best linear fit: no learning at all
  prompt mean      f = the mean return of the prompt's other G - 1 samples, from the M continuations
                   of each one's pure-noise state (leave-one-out: GRPO's group baseline, with less
                   noise), the same for every state
The gap between the ceiling and the learned critic is how much variance reduction a better-trained
critic could still give; the gap between the ceiling and the prompt mean is what a state-aligned
critic can give that GRPO's baseline cannot.
The ceiling's rise from x_j to x_(j+1) is the share of the reward's variance that step j's own noise
decides: the signal in that step's policy gradient, which per-step credit (GAE lambda < 1) isolates
and R - V(x_j) buries under the shares of every later step. --windows measures several samplers
(K steps, the first S stochastic) on the same prompts, to see how a longer window spreads that share.

Run:  python bench/value_ceiling.py        # writes bench/results/value_ceiling.json and its BENCHMARKS.md section
      python bench/value_ceiling.py --windows 10:5 20:10 --fit-iters 0   # two windows, no learned critic
      python bench/value_ceiling.py --windows 10:7 --append             # one more window beside them
      python bench/value_ceiling.py --windows 10:5 --oracle-m 4 16 --append   # and the oracle critic's advantages
      python bench/value_ceiling.py --report-only                        # the section from the JSON
"""
import argparse
import itertools
import json
import os
import shlex
import sys

import torch

from common import RESULTS, machine, write_json, write_section


def explained(f, R):
    """f (N,) or (N, M) predictions, R (N, M) returns -> 1 - Var(R - f) / Var(R) over all N*M pairs."""
    return (1 - (R - f.expand_as(R)).var() / R.var()).item()


@torch.no_grad()
def continue_from(backbone, x, j, cond, schedule, K, noise_level, S, generator):
    """Run the sampler from states x (N, C, H, W) at step j to the end: the final images."""
    import rollout
    for jj in range(j, K):
        js = torch.full((len(x),), jj, dtype=torch.long)
        x = rollout.step(backbone, x, js, cond, schedule, rollout.step_noise(noise_level, S, js), generator=generator)[0]
    return backbone.decode(x)


def window(text):
    """'K:S' -> (K, S): K denoising steps, the first S stochastic; None if malformed."""
    try:
        K, S = (int(v) for v in text.split(":"))
    except ValueError:
        return None
    return (K, S) if 1 <= S <= K else None


def measure(backbone, args, pool, K, S):
    """The rows of one sampler (K steps, SDE window S): one per state j = 0..S of the window; and the
    fitted learned critic's values, traj -> (B, S) (None without --fit-iters)."""
    import critic as critic_lib
    import rewards
    import rollout
    import toy
    from tqdm import tqdm
    G, M, P = args.samples, args.branches, len(pool)
    noise_level = rollout.TRAIN_NOISE[backbone.sampler]                # train.py's default
    g = torch.Generator().manual_seed(args.seed)
    metas = [m for m in pool for _ in range(G)]                          # prompt-major: (P * G,)
    prompts = [m["prompt"] for m in metas]
    score = lambda images: toy.check(images, metas)[1]                  # the `shapes` reward: partial credit
    traj = rollout.sample(backbone, prompts, K, noise_level, generator=g, sde_steps=S)
    schedule = backbone.schedule(K)

    values = learned = None     # the learned critic, fitted as train.py --critic-fraction 1 fits it, on fresh rollouts
    if args.fit_iters:
        torch.manual_seed(args.seed)
        V = critic_lib.Critic(backbone, num_rewards=1)
        stream = critic_lib.rollouts(backbone, pool, rewards.build_reward("shapes"), 32, K, S, g)
        mean, std = critic_lib.fit(backbone, V, itertools.islice(stream, args.fit_iters), generator=g,
                                   progress=lambda it: tqdm(it, total=args.fit_iters, desc="fitting the critic"))
        learned = lambda t: V.values(backbone, t, steps=S)[..., 0] * std + mean     # traj -> (B, S), R's scale
        values = learned(traj)                                               # (N, S)

    rows = []
    g = torch.Generator().manual_seed(args.seed + 1)   # the continuations' own noise: the same whatever --fit-iters
    for j in tqdm(range(S + 1), desc=f"K={K} S={S}: branching from each state"):
        x = traj.latents[:, j].float()
        R = torch.stack([score(continue_from(backbone, x, j, traj.cond, schedule, K, noise_level, S, g))
                         for _ in range(M)], 1)                           # (N, M)
        ceiling = 1 - (R.var(1).mean() / R.var()).item()
        if j == 0:   # E[R | c] for each sample, from its prompt's other G - 1 samples (their M continuations each)
            per_sample = R.view(P, G, M).mean(2)                 # (P, G)
            prompt_mean = ((per_sample.sum(1, keepdim=True) - per_sample) / (G - 1)).reshape(-1, 1)   # (N, 1)
        row = {"state": j, "noise_fraction": critic_lib.noise_fraction(backbone, traj.levels[j:j + 1]).item(),
               "ceiling": ceiling, "prompt_mean": explained(prompt_mean, R), "var_R": R.var().item(),
               "learned_critic": explained(values[:, j:j + 1], R) if values is not None and j < S else None}
        if j < K:                                                          # the reward of the one-step x0 estimate
            tweedie = score(backbone.decode(traj.pred_x0[:, j]))          # (N,)
            row["tweedie_r2"] = torch.corrcoef(torch.stack([tweedie.repeat_interleave(M), R.flatten()]))[0, 1].nan_to_num().pow(2).item()
        rows.append(row)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return shares(rows), learned


@torch.no_grad()
def advantage_noise(backbone, pool, K, S, values, seed, batches=8, **label):
    """What a critic gives the update at the base policy: the variance of its advantages at each step
    of the window, as a fraction of Var R, at GAE lambda 0 (V(x_(j+1)) - V(x_j)) and lambda 1
    (R - V(x_j)), over `batches` rollout batches of 32 of the pool's prompts. values(traj, r) -> (B, S)
    V at the window's states, on R's scale (r (B, 1): the batch's rewards, which only the fitted proxy
    reads). Step j's true signal is its share s_j; the rest is the critic's error (V = 0 at lambda 1 gives
    every step the whole Var R). Also each step's squared offset
    (its mean advantage less the mean over every step, over Var R): what centring over the whole
    batch (train.py --adv-norm batch) adds to that step on top of its variance, and centring per step
    (--adv-norm step) does not."""
    import ppo
    import rollout
    import toy
    g = torch.Generator().manual_seed(seed + 2)
    A, R = {"0": [], "1": []}, []
    for b in range(batches):
        metas = [pool[i] for i in torch.randint(len(pool), (32,), generator=g)]
        traj = rollout.sample(backbone, [m["prompt"] for m in metas], K, rollout.TRAIN_NOISE[backbone.sampler],
                              generator=g, sde_steps=S, metas=metas)
        r = toy.check(traj.images.float().cpu(), metas)[1][:, None]                 # (B, 1)
        V = values(traj, r)[..., None]                                               # (B, S, 1)
        for lam in A:
            A[lam].append(ppo.gae(r, V, 1.0, float(lam))[0][..., 0])
        R.append(r[:, 0])
    R = torch.cat(R)                                                                 # (N,)
    out = {**label, "trajectories": len(R)}
    for lam, a in A.items():
        a = torch.cat(a)                                                             # (N, S)
        out[f"var_lambda{lam}"] = (a.var(0) / R.var()).tolist()
        out[f"offset_lambda{lam}"] = ((a.mean(0) - a.mean()) ** 2 / R.var()).tolist()
    return out


def critics_noise(backbone, args, pool, K, S, learned):
    """advantage_noise of the oracle at each --oracle-m and, with --proxy-and-learned, of the proxy, of
    train.py's proxy-fit and of the fitted learned critic (learned: traj -> (B, S), or None)."""
    import critic as critic_lib
    import toy
    score = lambda images, prompts, metas: toy.check(images.float().cpu(), metas)[1][:, None]    # (B, 1)
    out = {"oracle": []}
    for M in args.oracle_m:
        oracle = critic_lib.OracleCritic(1, score, backbone.net, M, generator=torch.Generator().manual_seed(args.seed + 3))
        out["oracle"].append(advantage_noise(backbone, pool, K, S, lambda traj, r: oracle.values(backbone, traj, steps=S)[..., 0],
                                             args.seed, M=M))
    if args.proxy_and_learned:
        proxy = critic_lib.ProxyCritic(1, score)
        out["proxy"] = advantage_noise(backbone, pool, K, S, lambda traj, r: proxy.values(backbone, traj, steps=S)[..., 0],
                                       args.seed)
        fitted = critic_lib.FittedProxyCritic(1, score)
        out["proxy_fit"] = advantage_noise(backbone, pool, K, S, lambda traj, r: fitted.values(
            backbone, traj, steps=S, rewards=r)[..., 0], args.seed)
        if learned is not None:
            out["learned"] = advantage_noise(backbone, pool, K, S, lambda traj, r: learned(traj), args.seed)
    return out


def shares(rows):
    """Adds to each window state's row what step j's own noise decides (the ceiling's rise over the
    step) and the share of step j's advantage that is that signal, by what the advantage is: R - mean
    (V = 0) has Var R; R - E[R | x_j] (a perfect critic at GAE lambda 1) has (1 - ceiling_j) Var R; a
    perfect critic at lambda 0 gives E[R | x_(j+1)] - E[R | x_j], the signal alone (share 1)."""
    for a, b in zip(rows, rows[1:]):
        a["step_share"] = b["ceiling"] - a["ceiling"]
        a["signal_v0"], a["signal_perfect_l1"] = a["step_share"], a["step_share"] / max(1 - a["ceiling"], 1e-6)
    return rows


def table(rows, S):
    fmt = lambda v: "-" if v is None else f"{v:+.2f}"
    lines = ["| state (step j) | noise fraction | ceiling E[R \\| x_j] | decided by step j's noise | signal share of step "
             "j's advantage: V = 0 / perfect V, lambda 1 | learned critic V_phi | r(x0-hat), linear fit | prompt mean "
             "(GRPO's baseline) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = f"{r['state']}" + (" (pure noise)" if r["state"] == 0 else " (after the window)" if r["state"] == S else "")
        signal = "-" if "signal_v0" not in r else f"{r['signal_v0']:.2f} / " + (   # a ratio of two near-zeros: not shown
            f"{r['signal_perfect_l1']:.2f}" if 1 - r["ceiling"] >= 0.05 else "-")
        lines.append(f"| {label} | {r['noise_fraction']:.2f} | {fmt(r['ceiling'])} | {fmt(r.get('step_share'))} | {signal} | "
                     f"{fmt(r['learned_critic'])} | {fmt(r.get('tweedie_r2'))} | {fmt(r['prompt_mean'])} |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-dit", help="base model")
    p.add_argument("--prompts", type=int, default=32, help="training prompts P (a seeded draw of the world's training prompts)")
    p.add_argument("--samples", type=int, default=4, help="trajectories G per prompt")
    p.add_argument("--branches", type=int, default=8, help="continuations M from each state")
    p.add_argument("--windows", nargs="+", default=["10:5"],
                   help="samplers K:S, K denoising steps of which the first S are stochastic (train.py's "
                        "--num-steps and --sde-steps; its default on this world is 10:5). Without --append the "
                        "results file is rewritten with these alone")
    p.add_argument("--fit-iters", type=int, default=30,
                   help="rollout batches of 32 the learned critic is fitted on (0: no learned critic)")
    p.add_argument("--oracle-m", type=int, nargs="*", default=[],
                   help="also measure the oracle critic's advantages at the base policy with these numbers of "
                        "continuations (train.py --oracle-continuations), 256 trajectories each")
    p.add_argument("--proxy-and-learned", action="store_true",
                   help="also measure the advantages of the proxy critic (r(x0-hat)), of train.py's proxy-fit (a line per "
                        "step, leave-one-out over each batch of 32) and of the fitted learned critic (with --fit-iters) "
                        "as the oracle's, with each step's offset under centring over the whole batch")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the BENCHMARKS section from bench/results/value_ceiling.json, measuring nothing")
    p.add_argument("--append", action="store_true",
                   help="add these windows to bench/results/value_ceiling.json (measured with the same other flags)")
    args = p.parse_args()
    path = os.path.join(RESULTS, "value_ceiling.json")
    if args.report_only:
        result = json.load(open(path)) if os.path.isfile(path) else {}
        if "windows" not in result:
            p.exit(2, f"error: --report-only needs {path} written by this version (python bench/value_ceiling.py)\n")
        return report(result)
    if min(args.prompts, args.branches, *args.oracle_m) < 1 or args.samples < 2 or args.fit_iters < 0:
        p.exit(2, "error: --prompts, --branches and --oracle-m must be >= 1, --samples >= 2, --fit-iters >= 0\n")
    bad = [w for w in args.windows if window(w) is None]
    if bad:
        p.exit(2, f"error: --windows {bad[0]}: expected K:S, K denoising steps of which the first 1 <= S <= K are stochastic\n")
    args.windows = list(dict.fromkeys(window(w) for w in args.windows))      # each once, in the order given
    previous = None
    if args.append:
        previous = json.load(open(path)) if os.path.isfile(path) else None
        same = ("model", "prompts", "samples", "branches", "fit_iters", "seed")
        if previous is None or "windows" not in previous or any(previous["args"][k] != getattr(args, k) for k in same):
            p.exit(2, f"error: --append needs {path} measured with the same {', '.join('--' + k.replace('_', '-') for k in same)}\n")
    import toy
    from models import load_backbone
    backbone = load_backbone(args.model)
    g = torch.Generator().manual_seed(args.seed)
    train = toy.prompts("train")
    pool = [train[i] for i in torch.randperm(len(train), generator=g)[:args.prompts]]   # the same for every window
    windows = []
    for K, S in args.windows:
        rows, learned = measure(backbone, args, pool, K, S)
        windows.append({"num_steps": K, "sde_steps": S, "rows": rows, **critics_noise(backbone, args, pool, K, S, learned)})

    command = "python bench/value_ceiling.py " + shlex.join(sys.argv[1:])
    names = [f"{K}:{S}" for K, S in args.windows]
    if previous:                                     # the earlier windows first, a window measured again replaced
        earlier = {f"{w['num_steps']}:{w['sde_steps']}": w for w in previous["windows"]}
        for w in windows:                            # ... keeping the critics it measured that were not measured again
            old = earlier.get(f"{w['num_steps']}:{w['sde_steps']}", {})
            w["oracle"] = [o for o in old.get("oracle", []) if o["M"] not in args.oracle_m] + w["oracle"]
            w.update({k: old[k] for k in ("proxy", "proxy_fit", "learned") if k in old and k not in w})
        windows = [w for w in previous["windows"] if f"{w['num_steps']}:{w['sde_steps']}" not in names] + windows
        command, names = previous["command"] + "` then `" + command, [w for w in previous["args"]["windows"] if w not in names] + names
    result = {"command": command, "model": args.model, "machine": machine(),
              "args": {**{k: v for k, v in vars(args).items() if k != "append"}, "windows": names}, "windows": windows}
    write_json("value_ceiling", result)
    report(result)


def report(result):
    """The BENCHMARKS section from a result (what main wrote to bench/results/value_ceiling.json)."""
    a = result["args"]
    learned = f"learned critic fitted on {a['fit_iters'] * 32} fresh trajectories of the same prompts" \
        if a["fit_iters"] else "no learned critic"
    lines = [f"Command: `{result['command']}` ({result['model']} base model, {a['prompts']} training prompts x "
             f"{a['samples']} trajectories, {a['branches']} continuations from each state; {learned}). Explained "
             "variance of the `shapes` reward by each predictor, all against the same continuations' rewards; 'decided "
             "by step j's noise' is the ceiling's rise from x_j to x_(j+1), the signal in step j's policy gradient; the "
             "signal share is that rise over the variance of step j's advantage (a perfect critic at GAE lambda 0 makes "
             "it 1)."]
    for w in sorted(result["windows"], key=lambda w: (w["num_steps"], w["sde_steps"])):
        K, S = w["num_steps"], w["sde_steps"]
        lines += ["", f"**{K} steps, SDE window {S}**" + (" (train.py's default on this world)" if (K, S) == (10, 5) else ""),
                  ""] + table(rows := shares(w["rows"]), S)
        critics = [(f"oracle, M = {o['M']}", o) for o in w.get("oracle", [])] + [
            (name, w[key]) for key, name in (("proxy", "proxy r(x0-hat)"), ("proxy_fit", "proxy-fit a_j + b_j r(x0-hat)"),
                                  ("learned", "learned (fitted above)")) if key in w]
        if critics:
            lines += ["", f"Critics' advantages at the base policy ({critics[0][1]['trajectories']} trajectories; variance "
                      "at each step as a fraction of Var R, each step centred on its own mean (--adv-norm step); "
                      "'over the batch': plus the step's squared offset from the mean over all steps, what "
                      "--adv-norm batch leaves in; V = 0 gives 1.00 at every step at lambda 1, and at lambda 0 1.00 at the last "
                      "step and 0 before it):", "",
                      "| advantage | " + " | ".join(f"step {j}" for j in range(S)) + " | sum over the window |",
                      "|---|" + "---|" * (S + 1),
                      "| what the step decides, s_j (above) | " + " | ".join(f"{r['step_share']:.2f}" for r in rows[:S])
                      + f" | {sum(r['step_share'] for r in rows[:S]):.2f} |"]
            for name, o in critics:
                for lam in ("0", "1"):
                    variants = [("", o[f"var_lambda{lam}"])]
                    if f"offset_lambda{lam}" in o:
                        variants.append((", over the batch", [v + d for v, d in zip(o[f"var_lambda{lam}"],
                                                                                      o[f"offset_lambda{lam}"])]))
                    for suffix, v in variants:
                        lines.append(f"| {name}, lambda {lam}{suffix} | " + " | ".join(f"{x:.2f}" for x in v)
                                     + f" | {sum(v):.2f} |")
    write_section("value-ceiling", "## How predictable the return is from a noisy latent (built-in world)\n\n"
                  + "\n".join(lines))


if __name__ == "__main__":
    main()
