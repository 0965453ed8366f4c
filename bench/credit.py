"""Credit assignment: what the critic adds to RL, bounded by an oracle critic (arXiv 2605.27736's one
idea, its Fig. 2: values on noisy latents give every denoising step its own credit; METHOD.md 4).

Every variant is train.py on the built-in world at the same budget, seeds and schedule; only what
makes the advantage differs:
  grpo               GRPO: 4 prompts x 8 samples, the group baseline, one advantage per trajectory
  no-critic          --critic none: V = 0, the batch-normalised return at every step (32 prompts x 1)
  no-critic-groups   --critic none at GRPO's layout (4 x 8): separates the baseline from the layout
  proxy-critic-lX    --critic proxy: r(decode(x0_hat(x_t))), FK-steering's potential, at gae_lambda X
  proxyfit-critic-lX --critic proxy-fit: the proxy on R's scale, a + b r(x0_hat) per step, the line fitted to the
                     batch's other trajectories (leave-one-out), at gae_lambda X
  critic-lX          the paper's learned critic as it was before (its head on this batch at head lr 1e-3, no
                     x_(t_1), no text tokens) at gae_lambda X
  proxyin-critic-lX  critic-lX whose head also reads the proxy r(x0_hat) through a gain per noise level
                     (--critic-proxy-input): V = head + g(t) r, learned like the rest of the head
  fitted-critic-lX   the learned critic fitted harder (train.py's default before --critic-replay-states): its head on the
                     last 32 iterations' states at head lr 1e-4, also on x_(t_1) and the prompt's text tokens,
                     at gae_lambda X
  lastreplay-critic-lX  train.py's default on the built-in world: the fitted critic replaying the earlier
                     batches' x_(t_1) only (--critic-replay-states last): their window states' returns are
                     mostly noise, which its passes memorise (bench/critic_health.py), at gae_lambda X
  oracle-critic-lX   --critic oracle: the mean reward of M continuations of the current policy from
                     x_t (common random numbers), at gae_lambda X: the bound on any critic
  NAME-step          any of the above with its advantages centred per step (--adv-norm step): removes the
                     critic's per-noise-level bias, which centring over the whole batch leaves as noise
  critic-no-warmup   the learned critic without value warm-up (--value-warmup 0), at its best lambda
  critic-no-adaln    ... without the head's AdaLN noise-level modulation (--critic-adaln off)
  raft               rejection-sampling fine-tuning on the strict passes (the supervised reference)
  perfect-data       bench/oracle.py: the same LoRA trained on perfectly rendered scenes of the training
                     prompts with the pretraining loss (no reward, no sampling), the same images
Reported per variant: held-out strict accuracy (deterministic sampler, 8 seeds per prompt) against
images, the final policy's strict accuracy on the training prompts, training time per image, and
the critic's explained variance by noise level. Runs accumulate: a finished run is reused, an
interrupted one resumed, so seeds and variants can be added over several sittings.

Run:  python bench/credit.py --variants no-critic,oracle-critic-l0 --seeds 0 1 --jobs 2   # runs, then report
      python bench/credit.py --report-only                 # table, JSON, PNG, BENCHMARKS section from finished runs
      python bench/credit.py --tag w10-10 --train-flags "--lr-schedule constant --lr 3e-4 --sde-steps 10" --variants no-critic --seeds 0
                                                           # a second benchmark (another window), its own runs and section
Writes bench/results/credit_<model>[_<tag>].json and .png, and the BENCHMARKS.md section credit-<model>[-<tag>].
"""
import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from common import (RESULTS, ROOT, last_quarter, machine, mean, pm, prompt_accuracy, se, train_run, write_json,
                    write_section)

LAMBDAS = ("1", "0.95", "0.8", "0.5", "0")


def variant_flags(name, oracle_m):
    """train.py's flags for a variant name (see the module docstring); None if unknown."""
    fixed = {"grpo": "--algo grpo", "no-critic": "--critic none", "no-critic-groups": "--critic none --group-size 8",
             "raft": "--algo raft", "critic-no-warmup": "--value-warmup 0", "critic-no-adaln": "--critic-adaln off",
             "perfect-data": ""}
    if name in fixed:
        return fixed[name]
    if name.endswith("-step"):              # a PPO variant, its advantages centred per step
        base = name[:-len("-step")]
        flags = None if base in ("grpo", "raft", "perfect-data") else variant_flags(base, oracle_m)
        return None if flags is None else f"{flags} --adv-norm step".strip()
    for prefix, flags in (("proxy-critic-l", "--critic proxy"), ("proxyfit-critic-l", "--critic proxy-fit"),
                          ("oracle-critic-l", f"--critic oracle --oracle-continuations {oracle_m}"),
                          ("critic-l", "--critic-replay 1 --critic-head-lr 1e-3 --no-critic-terminal --no-critic-text"),
                          ("proxyin-critic-l", "--critic-replay 1 --critic-head-lr 1e-3 --no-critic-terminal --no-critic-text "
                                               "--critic-proxy-input"),
                          ("fitted-critic-l", "--critic-replay 32 --critic-head-lr 1e-4 --critic-terminal --critic-text"),
                          ("lastreplay-critic-l", "--critic-replay 32 --critic-head-lr 1e-4 --critic-terminal --critic-text "
                                                  "--critic-replay-states last")):
        if name.startswith(prefix) and name[len(prefix):] in LAMBDAS:
            return f"{flags} --gae-lambda {name[len(prefix):]}".strip()
    return None


def perfect_data_run(args, run_dir, seed):
    """bench/oracle.py for one seed at the budget and schedule of the RL runs: curve.json in run_dir."""
    out = os.path.join(run_dir, "curve.json")
    if os.path.isfile(out):
        return run_dir
    os.makedirs(run_dir, exist_ok=True)
    cmd = [sys.executable, os.path.join(ROOT, "bench", "oracle.py"), "--model", args.model, "--images", str(args.images),
           "--every", str(args.eval_every * args.batch_size), "--seeds", str(seed), "--schedule",
           "cosine" if "cosine" in args.train_flags else "constant", "--save", out]
    flags = shlex.split(args.train_flags)                     # the RL runs' learning rate, where they set one
    if "--lr" in flags:
        cmd += ["--lr", flags[flags.index("--lr") + 1]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    with open(run_dir + ".log", "w") as log:
        if subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT):
            raise SystemExit(f"perfect-data seed {seed} failed; see {run_dir}.log")
    return run_dir


def run_one(args, name, seed):
    run_dir = os.path.join(args.runs, f"{name}-seed{seed}")
    t0 = time.time()
    if name == "perfect-data":
        perfect_data_run(args, run_dir, seed)
    else:
        flags = shlex.split(args.train_flags) + shlex.split(variant_flags(name, args.oracle_m)) + ["--seed", str(seed)]
        train_run(args, run_dir, flags, f"{name} seed {seed}")
    print(f"{name} seed {seed}: done ({time.time() - t0:.0f}s)", flush=True)


def read(args, name, run_dir):
    """One finished run's figures, or None if it has not finished."""
    if name == "perfect-data":
        path = os.path.join(run_dir, "curve.json")
        if not os.path.isfile(path):
            return None
        c = json.load(open(path))
        return {"images": c["images"], "heldout_strict": c["heldout_strict"], "train_strict": c.get("train_strict"),
                "train_curve": None, "time_per_image_ms": None, "ev_by_noise": {}, "extra_images": 0}
    if not any(os.path.isdir(os.path.join(run_dir, d)) for d in ("pipeline", "policy_lora")):
        return None
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    evals = [r for r in rows if "eval/heldout_strict" in r]
    accuracy = prompt_accuracy(os.path.join(run_dir, "pipeline"), range(args.eval_seeds),
                               os.path.join(run_dir, "prompt_accuracy.json"))
    window = 20                  # training-prompt strict accuracy of the rollouts, 20-iteration means (640 images)
    strict = [(r["images"], r["reward/train/strict"]) for r in rows if "reward/train/strict" in r]
    train_curve = [[strict[i + window - 1][0], sum(s for _, s in strict[i:i + window]) / window]
                   for i in range(0, len(strict) - window + 1, window)]
    tail = [r for r in rows[-20:] if any(k.startswith("critic/ev_noise_") for k in r)]
    ev = {k[len("critic/ev_noise_"):]: sum(r[k] for r in tail) / len(tail) for k in tail[-1]
          if k.startswith("critic/ev_noise_")} if tail else {}
    # the median iteration (warm-up and start-up left out): robust to an iteration stalled by something else
    steady = sorted(r["time/per_image_s"] for r in rows if r["iter"] > 5 and "time/per_image_s" in r)
    values = sorted(r["time/critic_values_s"] / args.batch_size for r in rows if r["iter"] > 5 and "time/critic_values_s" in r)
    return {"images": [r["images"] for r in evals], "heldout_strict": [r["eval/heldout_strict"] for r in evals],
            "train_strict": accuracy["train"]["prompt_mean"], "train_curve": train_curve,
            "time_per_image_ms": 1000 * steady[len(steady) // 2],
            "critic_values_ms_per_image": 1000 * values[len(values) // 2] if values else 0.0,
            "ev_by_noise": ev, "extra_images": sum(r.get("critic/continuation_images", 0) for r in rows)}


def collect(args):
    """{variant: {"flags", "gae_lambda", "seeds", "heldout_strict", "train_strict", "curve", "time_per_image_ms", ...}}
    over the finished runs under args.runs."""
    found = {}
    for entry in sorted(os.listdir(args.runs)) if os.path.isdir(args.runs) else []:
        if "-seed" not in entry or entry.endswith(".log") or entry.endswith(".json"):
            continue
        name, seed = entry.rsplit("-seed", 1)
        if variant_flags(name, args.oracle_m) is None:
            continue
        run = read(args, name, os.path.join(args.runs, entry))
        if run is not None:
            found.setdefault(name, {})[int(seed)] = run
    out = {}
    for name, runs in found.items():
        seeds = sorted(runs)
        base = name[:-len("-step")] if name.endswith("-step") else name
        lam = base.rsplit("-l", 1)[1] if base.rsplit("-l", 1)[-1] in LAMBDAS and "-l" in base else "1"
        out[name] = {"flags": variant_flags(name, args.oracle_m), "gae_lambda": float(lam), "seeds": seeds,
                     "heldout_strict": [runs[s]["heldout_strict"][-1] for s in seeds],
                     "heldout_strict_run_mean": [mean(runs[s]["heldout_strict"][1:]) for s in seeds],
                     "heldout_strict_last_quarter": [last_quarter(runs[s]["images"], runs[s]["heldout_strict"])
                                                     for s in seeds],
                     "train_strict": [runs[s]["train_strict"] for s in seeds],
                     "curve": {"images": runs[seeds[0]]["images"],
                               "heldout_strict": [runs[s]["heldout_strict"] for s in seeds],
                               "train_strict_rollouts": [runs[s]["train_curve"] for s in seeds]},
                     "time_per_image_ms": [runs[s]["time_per_image_ms"] for s in seeds],
                     "critic_values_ms_per_image": [runs[s].get("critic_values_ms_per_image") for s in seeds],
                     "extra_images_per_run": [runs[s]["extra_images"] for s in seeds],
                     "critic_ev_by_noise_last20": {k: mean([runs[s]["ev_by_noise"][k] for s in seeds if runs[s]["ev_by_noise"]])
                                                   for k in runs[seeds[0]]["ev_by_noise"]}}
    return out


def best(variants, prefix):
    """The name of the variant prefix-l<lambda> with the highest mean final held-out accuracy, among those
    with the most seeds: a sweep's rows of 2-3 seeds are shown in the table, not chosen over a full row."""
    names = [n for n in variants if n.startswith(prefix) and n[len(prefix):] in LAMBDAS]
    most = max((len(variants[n]["heldout_strict"]) for n in names), default=0)
    names = [n for n in names if len(variants[n]["heldout_strict"]) == most]
    return max(names, key=lambda n: mean(variants[n]["heldout_strict"])) if names else None


def images_to_reach(v, target):
    """The first evaluation where the seed-mean held-out curve reaches target, or None."""
    curve = [mean(c) for c in zip(*v["curve"]["heldout_strict"])]
    return next((n for n, a in zip(v["curve"]["images"], curve) if n > 0 and a >= target), None)


def table(variants):
    lines = ["| variant | train.py flags | seeds | held-out strict, final (mean ± s.e.) | held-out strict, mean over the "
             "run's evaluations | held-out strict, last quarter's evaluations | training prompts, final | ms per image | "
             "critic EV by noise (last 20 its) |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = sorted(variants, key=lambda n: -mean(variants[n]["heldout_strict"]))
    for n in order:
        v = variants[n]
        t = [x for x in v["time_per_image_ms"] if x]
        ev = ", ".join(f"{k}: {x:+.2f}" for k, x in v["critic_ev_by_noise_last20"].items())
        train = [x for x in v["train_strict"] if x is not None]
        lines.append(f"| {n} | `{v['flags'] or 'defaults'}` | {len(v['seeds'])} | {pm(v['heldout_strict'])} | "
                     f"{pm(v['heldout_strict_run_mean'])} | {pm(v['heldout_strict_last_quarter'])} | "
                     + (pm(train) if train else "-")
                     + f" | {mean(t):.0f} |" if t else " | - |")
        lines[-1] += f" {ev or '-'} |"
    return "\n".join(lines)


def compare(variants, a, b, key="heldout_strict"):
    """'a - b = d (k combined s.e.)' for two variants' final held-out accuracy (or key's figure)."""
    if a not in variants or b not in variants:
        return None
    x, y = variants[a][key], variants[b][key]
    d, s = mean(x) - mean(y), math.hypot(se(x), se(y))
    out = {"difference": d, "combined_se": s, "in_se": d / s if s > 0 else float("nan")}
    if min(len(x), len(y)) == 1 and max(len(x), len(y)) >= 3:
        # one seed on a side: borrow the seed-to-seed spread of the other (an assumption, said so where shown)
        many = x if len(x) > 1 else y
        s_borrowed = se(many) * math.sqrt(len(many)) * math.sqrt(1 + 1 / len(many))
        out.update(borrowed_se=s_borrowed, in_borrowed_se=d / s_borrowed if s_borrowed > 0 else float("nan"))
    return out


def plot(variants, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    for n in sorted(variants, key=lambda n: -mean(variants[n]["heldout_strict"])):
        v = variants[n]
        curve = [mean(c) for c in zip(*v["curve"]["heldout_strict"])]
        axes[0].plot(v["curve"]["images"], curve, marker="o", ms=2, label=f"{n} ({len(v['seeds'])} seeds)")
        rollouts = [c for c in v["curve"]["train_strict_rollouts"] if c]
        if rollouts:
            axes[1].plot([p[0] for p in rollouts[0]], [mean(ps) for ps in zip(*[[p[1] for p in c] for c in rollouts])],
                         label=n)
    axes[0].set_title(f"{title}: held-out strict accuracy (deterministic sampler)")
    axes[1].set_title("training prompts: strict accuracy of the rollouts (SDE sampler, 640-image means)")
    for ax in axes:
        ax.set_xlabel("training images generated"), ax.grid(alpha=0.3)
    axes[0].set_ylabel("strict accuracy"), axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-dit", help="tiny-dit | tiny-unet")
    p.add_argument("--variants", default="grpo,no-critic,critic-l1", help="comma-separated (module docstring)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--images", type=int, default=20480, help="training images per run")
    p.add_argument("--batch-size", type=int, default=32, help="images per iteration")
    p.add_argument("--eval-every", type=int, default=20, help="held-out evaluation every N iterations")
    p.add_argument("--eval-seeds", type=int, default=8, help="images per held-out prompt in each evaluation")
    p.add_argument("--oracle-m", type=int, default=4, help="--oracle-continuations of the oracle variants")
    p.add_argument("--train-flags", default="--lr-schedule constant --lr 3e-4",
                   help="train.py flags every variant shares (the budget's schedule; a benchmark's first run fixes "
                        "them in its runs' settings.json, which later runs reuse)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each on --threads threads)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--runs", default=None, help="where the runs go (default bench/runs/credit_<model>[_<tag>])")
    p.add_argument("--tag", default="", help="a second benchmark beside the first, e.g. at another --train-flags: "
                   "its runs, results and BENCHMARKS section are named credit_<model>_<tag>")
    p.add_argument("--report-only", action="store_true", help="only read finished runs")
    p.add_argument("--shipped", default="lastreplay-critic-l1",
                   help="the variant that is train.py's default learned critic: the JSON's and the table's 'critic'")
    args = p.parse_args()
    if args.tag and not (args.tag.isascii() and args.tag.replace("-", "").isalnum()):
        p.exit(2, f"error: --tag {args.tag!r}: letters, digits and '-' only\n")
    args.name = f"credit_{args.model}" + (f"_{args.tag}" if args.tag else "")
    args.runs = args.runs or os.path.join(ROOT, "bench", "runs", args.name)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if variant_flags(n, args.oracle_m) is None]
    if unknown:
        p.exit(2, f"error: unknown variant(s) {', '.join(unknown)}\n")
    settings = os.path.join(args.runs, "settings.json")
    if os.path.isfile(settings):      # every run of one benchmark shares its budget and schedule
        fixed = json.load(open(settings))
        for key in ("images", "batch_size", "eval_every", "eval_seeds", "oracle_m", "train_flags"):
            setattr(args, key, fixed[key])
    if not args.report_only:
        os.makedirs(args.runs, exist_ok=True)
        if not os.path.isfile(settings):
            write_json(settings.removesuffix(".json"), {k: getattr(args, k) for k in (
                "model", "images", "batch_size", "eval_every", "eval_seeds", "oracle_m", "train_flags")})
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: run_one(args, *job), [(n, s) for s in args.seeds for n in names]))
    variants = collect(args)
    if not variants:
        p.exit(1, f"no finished runs under {args.runs}\n")
    refs = {"critic": args.shipped if args.shipped in variants else None,
            "proxy-critic": best(variants, "proxy-critic-l"), "oracle-critic": best(variants, "oracle-critic-l"),
            "proxyfit-critic": best(variants, "proxyfit-critic-l"), "proxyin-critic": best(variants, "proxyin-critic-l")}
    named = {k: v for k, v in variants.items()}
    for alias, name in refs.items():
        if name:
            named[alias] = {**variants[name], "variant": name}
    comparisons = {f"{a} - {b}": compare(named, a, b) for a, b in (
        ("oracle-critic", "no-critic"), ("critic", "no-critic"), ("critic", "proxy-critic"), ("critic", "grpo"),
        ("no-critic", "grpo"), ("no-critic-groups", "grpo"), ("no-critic", "no-critic-groups"),
        ("critic", "oracle-critic"), ("proxyfit-critic", "no-critic"), ("proxyin-critic", "no-critic"),
        ("proxyin-critic", "proxyfit-critic"), ("proxyin-critic", "grpo"))}
    key_pairs = (("oracle-critic", "no-critic"), ("critic", "no-critic"), ("critic", "grpo"), ("oracle-critic", "grpo"),
                 ("no-critic-groups", "no-critic"), ("proxyfit-critic", "no-critic"), ("proxyin-critic", "no-critic"),
                 ("proxyin-critic", "proxyfit-critic"), ("proxyin-critic", "grpo"))
    comparisons.update({f"{a} - {b}, last quarter": compare(named, a, b, "heldout_strict_last_quarter") for a, b in key_pairs})
    comparisons.update({f"{a} - {b}, mean over the run": compare(named, a, b, "heldout_strict_run_mean") for a, b in key_pairs})
    for a, b in (("critic", "grpo"), ("oracle-critic", "no-critic"), ("critic", "no-critic"), ("proxyfit-critic", "no-critic"),
                 ("proxyin-critic", "no-critic"), ("proxyin-critic", "grpo")):
        if a in named and b in named:            # how soon a reaches b's final accuracy (the 'half the images' target)
            comparisons[f"images for {a} to reach {b}'s final"] = {
                "images": images_to_reach(named[a], mean(named[b]["heldout_strict"])), "of": named[b]["curve"]["images"][-1]}
    out, tag = os.path.join(RESULTS, args.name), f" --tag {args.tag}" if args.tag else ""
    write_json(out, {"images": args.images, "model": args.model, "train_flags": args.train_flags, "machine": machine(),
                     "command": f"python bench/credit.py --model {args.model}{tag} --variants ... --seeds ... "
                                f"(settings: {args.runs}/settings.json)",
                     "oracle_continuations": args.oracle_m, "variants": named,
                     "comparisons": {k: v for k, v in comparisons.items() if v}})
    plot(variants, out + ".png", f"{args.model}, {args.images:,} images per run")
    lines = [f"## Credit assignment on {args.model}{' (' + args.tag + ')' if args.tag else ''}: what the critic adds "
             f"({args.images:,} images per run)", "",
             f"Command: `python bench/credit.py --model {args.model}{tag} --variants NAMES --seeds S...` with every run at "
             f"`{args.train_flags}`, batch {args.batch_size}, held-out evaluation every {args.eval_every} iterations "
             f"with {args.eval_seeds} seeds per prompt (deterministic sampler); one thread per run, two runs at once; "
             f"oracle: {args.oracle_m} continuations per state (its continuation images are not counted as training "
             "images). ms per image: training wall time per training image beside one other run (the oracle's "
             "continuations included; the median iteration's).", "", table(variants), "", "Comparisons (held-out strict: final, the last "
             "quarter's evaluations, the run's mean; the difference in combined standard errors):", ""]
    for k, v in comparisons.items():
        if v and "difference" in v:
            if v["combined_se"] > 0:
                note = f"({v['in_se']:+.1f} s.e.)"
            elif "borrowed_se" in v:
                note = (f"(one seed on a side: {v['in_borrowed_se']:+.1f} s.e. if its seeds spread as the other "
                        "side's do)")
            else:
                note = "(one seed on each side: no standard error yet)"
            lines.append(f"- {k}: {v['difference']:+.3f} {note}")
        elif v:
            lines.append(f"- {k}: {v['images'] or 'not reached'} of {v['of']}")
    lines += ["", f"![curves](bench/results/{args.name}.png)"]
    write_section(args.name.replace("_", "-"), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
