"""Steering with the learned critic at equal compute (arXiv 2605.27736, its Figs. 7 and 9; METHOD.md 7).

From the final policy and critic of a train.py critic-PPO run on the built-in world (or, with --run a
directory that bench/critic_fit.py --save wrote, the base model and a critic fitted to its rollouts,
written with --out steering_base to a section of its own): held-out strict
accuracy and the `shapes` reward of each steering method at 1x, 2x, 4x and 8x the denoiser passes
of one unsteered sample (N = 1, 2, 4, 8), over held-out prompts x --seeds seeds (mean ± standard
error over prompts), with each method's critic and reward passes per image beside it. A control
beside it separates a weak critic from a weak use of it: best-of-N on one set of candidates chosen by
each selector (the critic at the last window state, as bon does without --critic-terminal; at the first
deterministic state, after which the image is fixed; at the last state, as bon does with it; the proxy
reward at the first deterministic state; the true reward, the oracle). `none` is
the unsteered policy on the same sampler (the training sampler: the critic's window stochastic);
`grad` costs 1x denoiser passes plus the critic's forward and backward passes. proxy-smc chooses its
final particle by the reward (FK-steering's choice), so a matched control runs critic-smc with the same
final choice: the two then differ in the resampling potential alone; grad+bon with the same final
choice measures its guided candidates apart from the critic's choice among them. With several --guidance scales,
grad and grad+bon use the one whose grad+bon at 4x is best on training prompts (every 4th, seeds
apart from the evaluation's), so the scale is never chosen on the held-out prompts it is reported on.

Run:  python bench/steering.py --run runs/ppo-tiny-dit-...
      python bench/steering.py --run DIR --out steering_base       # DIR from bench/critic_fit.py --save
Writes bench/results/steering.json ({"methods": {METHOD: {MULT: {nfe, critic_passes, strict, strict_se,
reward}}}}), bench/results/steering.png and the section "steering" of BENCHMARKS.md.
"""
import argparse
import json
import math
import os

import torch

from common import machine, write_json, write_section
from cli import finite_float          # after common, which puts the repository root on sys.path

MULTS = (1, 2, 4, 8)
SWEEP_SEEDS = 2000    # the guidance sweep's first seed; the evaluation uses 0.., the selector control 1000..


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a train.py --algo ppo run on the built-in world (its pipeline/ and critic)")
    p.add_argument("--seeds", type=int, default=8, help="seeds per held-out prompt")
    p.add_argument("--lam", type=float, default=4.0, help="SMC inverse temperature (critic and proxy)")
    p.add_argument("--guidance", default="1,2,4,8,16", help="critic-gradient guidance scale s, or several separated "
                   "by commas: then the one whose grad+bon at 4x is best on training prompts")
    p.add_argument("--select", default="critic", choices=("critic", "reward"), help="how best-of-N chooses")
    p.add_argument("--out", default="steering", help="bench/results/OUT.json and .png, and the section OUT of BENCHMARKS.md")
    args = p.parse_args()
    try:
        scales = [finite_float(min=0)(x) for x in args.guidance.split(",")]
    except argparse.ArgumentTypeError as e:
        p.exit(2, f"error: --guidance {e}\n")
    import critic as critic_module
    import rollout
    import steer
    import toy
    from models import load_backbone
    config = json.load(open(os.path.join(args.run, "config.json")))
    fitted = not os.path.isdir(os.path.join(args.run, "pipeline"))  # bench/critic_fit.py --save: a critic, no policy
    policy = load_backbone(config["model"] if fitted else os.path.join(args.run, "pipeline"))
    base = load_backbone(config["model"])                          # the critic's backbone: the base weights
    critic = critic_module.load(base, args.run).eval()
    metas = toy.prompts("heldout")
    prompts = [m["prompt"] for m in metas]
    K, S = config["num_steps"], config["sde_steps"]
    terminal = bool(config.get("critic_terminal")) and S < K       # its critic learned x_{t_1} too: choose there
    text = " --critic-text" if config.get("critic_text") else ""    # its head also reads the prompt's tokens
    noise = config.get("noise_level") or rollout.TRAIN_NOISE[policy.sampler]
    value = steer.critic_value_fn(critic, base, prompts, policy.schedule(K), [1.0])
    # the guidance scale s, chosen on training prompts (every 4th) with seeds of their own: grad+bon at 4x
    seen = toy.prompts("train")[::4][:len(metas)]
    seen_value = steer.critic_value_fn(critic, base, [m["prompt"] for m in seen], policy.schedule(K), [1.0])
    sweep = {}
    for s in scales if len(scales) > 1 else []:
        sweep[str(s)] = run_method(policy, seen, "grad+bon", 4, K, noise, S, seen_value, "critic", args, terminal,
                                   guidance=s, seed0=SWEEP_SEEDS)
        print("guidance sweep, training prompts, grad+bon 4, s =", s, json.dumps(sweep[str(s)]), flush=True)
    guidance = max(scales, key=lambda s: sweep[str(s)]["strict"]) if sweep else scales[0]   # ties: the first

    if fitted:        # held-out explained variance per state of the window, after the fit
        curve = next(iter(json.load(open(os.path.join(args.run, "critic_fit.json")))["variants"].values()))
        ev = curve[-1]["heldout_ev_by_state"]
        about = ("Policy: the base model; critic: fitted to the base model's rollouts by `bench/critic_fit.py` "
                 f"(--critic-replay {config['critic_replay']}, head lr {config['critic_head_lr']}{text}), explained "
                 "variance on fresh rollouts of the training prompts by state of the window " + " / ".join(f"{x:+.2f}" for x in ev)
                 + (f", at the last state x_{K - 1} {curve[-1]['heldout_ev_last_state']:+.2f} (trained there: --critic-terminal)"
                    if terminal else "")
                 + (f"; on the held-out prompts, never trained on, at x_{K - 1} {curve[-1]['unseen_prompts_ev_last_state']:+.2f}"
                    if "unseen_prompts_ev_last_state" in curve[-1] else ""))
    else:
        rows = [json.loads(line) for line in open(os.path.join(args.run, "metrics.jsonl"))]
        tail = [r for r in rows[-10:] if "critic/explained_variance" in r]
        ev = {k[len("critic/ev_noise_"):]: sum(r[k] for r in tail) / len(tail) for k in tail[-1] if k.startswith("critic/ev_noise_")}
        if terminal:
            ev["last state"] = sum(r["critic/ev_terminal"] for r in tail) / len(tail)
        about = (f"Policy and critic: the run's final ones (`--critic-replay {config.get('critic_replay', 1)}"
                 + (" --critic-terminal" if terminal else "") + text + "`); the critic's in-loop explained variance over the "
                 "run's last 10 iterations, by noise fraction" + (f" and at the last state x_{K - 1}" if terminal else "")
                 + ": " + ", ".join(f"{k}: {v:+.2f}" for k, v in ev.items()))
    results = {"command": f"python bench/steering.py --run {args.run} --seeds {args.seeds} --lam {args.lam} "
                          f"--guidance {args.guidance} --select {args.select}" + (f" --out {args.out}" if args.out != "steering" else ""),
               "machine": machine(), "run": args.run, "policy": "base" if fitted else "run", "critic_explained_variance": ev,
               "guidance": guidance, "guidance_sweep_train_prompts": sweep, "methods": {}}
    plan = [("none", 1), ("grad", 1)] + [(m, n) for m in ("bon", "smc", "grad+bon", "proxy-smc") for n in MULTS[1:]]
    plan.insert(2, ("bon", 1))
    for method, n in plan:
        row = run_method(policy, metas, method, n, K, noise, S, value,
                         "reward" if method == "proxy-smc" else args.select, args, terminal, guidance=guidance)
        results["methods"].setdefault(method, {})[str(n)] = row
        print(method, n, json.dumps(row), flush=True)
    write_json(args.out, results)
    plot(results, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", args.out + ".png"))
    base_strict = results["methods"]["none"]["1"]["strict"]
    gain = lambda m: results["methods"][m]["4"]["strict"] - base_strict
    targets = {"smc_gains_1.5x_bon_at_4x": gain("smc") >= 1.5 * gain("bon") and gain("bon") > 0,
               "grad+bon_gains_1.5x_bon_at_4x": gain("grad+bon") >= 1.5 * gain("bon") and gain("bon") > 0,
               "critic_smc_beats_proxy_smc_at_4x": results["methods"]["smc"]["4"]["strict"]
               > results["methods"]["proxy-smc"]["4"]["strict"]}
    results["targets"] = targets
    # proxy-smc chooses its final particle by the reward itself (FK-steering has the reward at inference),
    # critic-smc by the critic: the matched control gives critic-smc the same final choice and the same
    # weighted states (the window only), so the two differ in the resampling potential alone. grad+bon's
    # candidates are guided up the same critic that then chooses among them: the same final choice by
    # the reward measures the guided candidates apart from the critic's choice
    for key, method, terminal_, guidance_ in (("smc_select_reward", "smc", False, 0.0),
                                              ("grad_bon_select_reward", "grad+bon", terminal, guidance)):
        results[key] = {}
        for n in MULTS[1:]:
            results[key][str(n)] = run_method(policy, metas, method, n, K, noise, S, value, "reward", args, terminal_,
                                              guidance=guidance_)
            print(f"{method} (final choice by the reward)", n, json.dumps(results[key][str(n)]), flush=True)
    results["selectors"] = selector_control(policy, value, metas, K, S, noise, args.seeds)
    # the same control on as many training prompts (every 4th), whose rollouts the critic learned from:
    # it separates a critic that ranks badly from one that ranks well only on what it has seen
    results["selectors_train_prompts"] = selector_control(policy, seen_value, seen, K, S, noise, args.seeds)
    write_json(args.out, results)
    lines = [f"Command: `{results['command']}` ({machine()}). {about}. Held-out prompts x "
             f"{args.seeds} seeds, strict accuracy (mean ± s.e. over prompts) and the `shapes` reward; the sampler is the "
             f"training one ({K} steps, the first {S} stochastic); per final image: denoiser passes (NFE), critic "
             "forward + backward passes, reward calls. " + (
                 f"grad and grad+bon guide with s = {guidance:g}, the best grad+bon at 4x on {len(seen)} training prompts "
                 f"(every 4th, {args.seeds} seeds of their own) among s = " + ", ".join(
                     f"{k} ({r['strict']:.3f})" for k, r in sweep.items()) + "." if sweep else f"Guidance scale s = {guidance:g}."), "",
             "| method | N | NFE | critic passes | reward calls | strict | shapes reward |", "|---|---|---|---|---|---|---|"]
    for method, rows in results["methods"].items():
        for n, r in rows.items():
            lines.append(f"| {method} | {n} | {r['nfe']:.0f} | {r['critic_passes']:.0f} | {r['reward_calls']:.0f} | "
                         f"{se(r)} | {r['reward']:.3f} |")
    lines += ["", f"![strict accuracy against NFE](bench/results/{args.out}.png)", "",
              "Targets at 4x NFE: " + ", ".join(f"{k}: {'met' if v else 'missed'}" for k, v in targets.items()) + ".", "",
              "proxy-smc chooses its final particle by the reward itself, smc by the critic. The matched control: smc "
              "with the final choice by the reward too, weighting the window's states only (as proxy-smc does), so that "
              "the two differ in the resampling potential alone. Beside it grad+bon with the same final choice: its "
              "candidates are guided up the critic that then chooses among them, and this measures the candidates apart "
              "from that choice:", "",
              "| N | NFE | smc, final choice by the reward | proxy-smc | grad+bon, final choice by the reward | grad+bon "
              "(critic) | bon by the reward (oracle selector, below) |", "|---|---|---|---|---|---|---|",
              *[f"| {n} | {r['nfe']:.0f} | {se(r)} | {se(results['methods']['proxy-smc'][n])} | "
                f"{se(results['grad_bon_select_reward'][n])} | {se(results['methods']['grad+bon'][n])} | "
                f"{results['selectors']['the reward itself (oracle)'][n]['strict']:.3f} |"
                for n, r in results["smc_select_reward"].items()], "",
              f"The control: best-of-N by each selector on the same {MULTS[-1]} candidates per prompt and seed (the first N "
              "of them), the unsteered sampler; strict accuracy of the chosen image (mean ± s.e. over prompts):", "",
              *selector_table(results["selectors"]), "",
              f"The same control on {len(seen)} training prompts (every 4th), the prompts whose rollouts the critic was "
              "trained on:", "", *selector_table(results["selectors_train_prompts"])]
    title = ("Steering the base model with a critic fitted to its rollouts, at equal NFE (built-in world" if fitted
             else "Steering with the critic at equal NFE (built-in world") + (
             ")" if S == 5 else f"; a longer stochastic window, {S} of {K} steps)")   # 5: train.py's window here
    write_section(args.out.replace("_", "-"), f"## {title}\n\n" + "\n".join(lines))
    print("\n".join(lines))


def se(row):
    """A row's strict accuracy as 'mean ± s.e.'."""
    return f"{row['strict']:.3f} ± {row['strict_se']:.3f}"


def scorer(metas):
    """The shapes reward of images of these prompts (idx: each image's prompt), as steer.steer calls it."""
    import toy
    return lambda images, idx: toy.check(images.cpu(), [metas[i] for i in idx])[1]


def run_method(policy, metas, method, n, K, noise, S, value, select, args, terminal, guidance=0.0, seed0=0):
    """One steering method at N = n over the prompts of metas x args.seeds seeds (seed0, seed0 + 1, ...):
    its row of the table (NFE per final image, strict accuracy mean ± s.e. over prompts, the shapes
    reward). value: the critic's value function for those prompts, in their order."""
    import steer
    import toy
    prompts, score = [m["prompt"] for m in metas], scorer(metas)
    strict, reward, nfe = [], [], None
    for seed in range(seed0, seed0 + args.seeds):
        g = torch.Generator().manual_seed(seed)
        out = steer.steer(policy, prompts, method, n, K, noise, S, value=value, score=score, select=select,
                          guidance=guidance, lam=args.lam, generator=g, terminal=terminal)
        s, r = toy.check(out.images, metas)
        strict.append(s.float()), reward.append(r)
        nfe = out.nfe
    strict, reward = torch.stack(strict), torch.stack(reward)             # (seeds, P)
    per_prompt = strict.mean(0)
    return {"nfe": nfe["denoiser"], "critic_passes": nfe["critic_forward"] + nfe["critic_backward"],
            "reward_calls": nfe["reward"], "strict": strict.mean().item(),
            "strict_se": per_prompt.std().item() / math.sqrt(len(per_prompt)), "reward": reward.mean().item()}


def selector_table(selectors):
    """Markdown rows of selector_control's output: one row per selector, one column per N."""
    return (["| selector | " + " | ".join(f"N = {n}" for n in MULTS) + " |", "|---|" + "---|" * len(MULTS)]
            + [f"| {name} | " + " | ".join(se(r) for r in by_n.values()) + " |"
               for name, by_n in selectors.items()])


@torch.no_grad()
def selector_control(policy, value, metas, K, S, noise, seeds):
    """Best-of-n for n in MULTS, on one set of N = MULTS[-1] rollouts per prompt and seed (the
    first n of them), chosen by each selector: {selector: {n: {strict, strict_se}}}."""
    import rollout
    import toy
    P, N = len(metas), MULTS[-1]
    idx = torch.arange(P).repeat_interleave(N)                                   # (P*N,)
    metas_n = [metas[i] for i in idx]
    names = (f"critic V(x_{S - 1}), the last window state", f"critic V(x_{S}), the first deterministic state",
             f"critic V(x_{K - 1}), the last state (--critic-terminal trains it)",
             f"proxy r(decode(x0-hat)) at x_{S}", "the reward itself (oracle)")
    chosen = {name: {n: [] for n in MULTS} for name in names}
    for seed in range(seeds):
        g = torch.Generator().manual_seed(1000 + seed)
        traj = rollout.sample(policy, [m["prompt"] for m in metas_n], K, noise, generator=g, sde_steps=S)
        strict, reward = toy.check(traj.images.cpu(), metas_n)                  # (P*N,) each
        scores = [value(traj.latents[:, S - 1].float(), S - 1, idx), value(traj.latents[:, S].float(), S, idx),
                  value(traj.latents[:, K - 1].float(), K - 1, idx), toy.check(policy.decode(traj.pred_x0[:, S]).float().cpu(), metas_n)[1], reward]
        for name, score in zip(names, scores):
            score, passed = score.float().cpu().view(P, N), strict.float().view(P, N)
            for n in MULTS:
                pick = score[:, :n].argmax(-1)                                   # (P,)
                chosen[name][n].append(passed[torch.arange(P), pick])
    out = {}
    for name, by_n in chosen.items():
        for n, picks in by_n.items():
            per_prompt = torch.stack(picks).mean(0)                              # (P,) over seeds
            out.setdefault(name, {})[str(n)] = {"strict": per_prompt.mean().item(),
                                                "strict_se": per_prompt.std().item() / math.sqrt(P)}
    return out


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, rows in results["methods"].items():
        xs = [r["nfe"] for r in rows.values()]
        ys = [r["strict"] for r in rows.values()]
        es = [r["strict_se"] for r in rows.values()]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
    ax.set_xscale("log", base=2), ax.set_xlabel("denoiser passes per final image"), ax.set_ylabel("held-out strict accuracy")
    ax.grid(alpha=0.3), ax.legend(fontsize=8)    # none and bon at N = 1 are one sampler: the same point
    ax.set_title(("the base model, a critic fitted to its rollouts" if results["policy"] == "base" else "an RL policy and its critic")
                 + f"; guidance s = {results['guidance']:g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
