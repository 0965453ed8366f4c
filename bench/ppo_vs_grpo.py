"""Critic-PPO against GRPO on the built-in world, side by side at equal images and seeds
(arXiv 2605.27736's main comparison; METHOD.md section 8).

For each algorithm and seed, runs train.py (tiny-dit, shapes reward, CPU, one thread) for the
same number of generated images, then reads each run's metrics.jsonl and reports:
  - held-out strict accuracy against images generated (the deterministic sampler on the
    world's held-out prompts; iteration 0 is the base model)
  - wall time per generated image (training only: rollouts, rewards, values, updates;
    evaluation, sample grids and checkpoints excluded), from the learning runs and, cleanly,
    from short timing runs of each algorithm alone on the machine (steady-state median)
  - the images critic-PPO needs to reach GRPO's final held-out accuracy
  - the critic's explained variance by noise level over the last iterations
  - each final policy's strict accuracy on the training prompts as well as the held-out ones,
    per category (a table of its own): a gain on the training prompts alone is sharpening on what
    RL saw, a gain on the held-out ones is what generalises (with train.py's --train-tags, RL saw
    only those categories' training prompts, and the others measure transfer too)
and writes bench/results/ppo_vs_grpo.json (raw curves per algorithm and seed) and .png.

Run:  python bench/ppo_vs_grpo.py                       # 3 seeds x 2 algorithms, sequentially
      python bench/ppo_vs_grpo.py --seeds 0 --images 640 --jobs 2 -- --lr 1e-4   (flags after -- go to train.py)
      python bench/ppo_vs_grpo.py --report-only          # re-read finished runs, rewrite table/JSON/PNG
      python bench/ppo_vs_grpo.py --images 20480 --batch-size 128 --eval-every 20 --timing-images 0 \
          --runs bench/runs/ppo_vs_grpo_8x --out bench/results/ppo_vs_grpo_8x -- ...   # its own section
      python bench/ppo_vs_grpo.py ... --runs bench/runs/counting_only --out bench/results/counting_only \
          -- --train-tags counting ...                 # RL on the counting prompts alone
"""
import argparse
import json
import os
import shlex
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

from common import RESULTS, ROOT, add_run_args, launch, prompt_accuracy, split_train_flags, train_run, write_json, write_section

ALGOS = ("ppo", "grpo", "raft")
LABELS = {"ppo": "critic-PPO", "grpo": "GRPO", "raft": "RAFT (supervised reference)"}
COLORS = {"ppo": "tab:red", "grpo": "tab:blue", "raft": "tab:gray"}


def own_flags(args, algo, extra):
    """train.py's flags for one algorithm: those after --, and for critic-PPO its --ppo-flags (the critic's
    own flags, which train.py refuses for algorithms without a critic)."""
    return [*extra, *(shlex.split(args.ppo_flags) if algo == "ppo" else [])]


def run_one(args, algo, seed, extra):
    return train_run(args, os.path.join(args.runs, f"{algo}-seed{seed}"),
                     ["--algo", algo, "--seed", str(seed), *own_flags(args, algo, extra)], f"{algo} seed {seed}")


def steady_ms_per_image(rows, skip):
    """Median training time per image over the iterations after the first `skip` (value warm-up
    and start-up excluded), in ms: robust to the odd iteration slowed by something else."""
    times = sorted(r["time/per_image_s"] for r in rows if r["iter"] > skip and "time/per_image_s" in r)
    return 1000 * times[len(times) // 2] if times else float("nan")


def timing(args, algo, extra):
    """One algorithm alone on the machine for --timing-images images: its steady per-image cost."""
    run_dir = os.path.join(args.runs, f"timing-{algo}")
    shutil.rmtree(run_dir, ignore_errors=True)
    flags = ["--model", args.model, "--algo", algo, "--run-dir", run_dir,
             "--iters", str(args.timing_images // args.batch_size), "--batch-size", str(args.batch_size),
             "--eval-every", str(10 ** 6), "--eval-seeds", "1", "--sample-every", str(10 ** 6), "--save-every", str(10 ** 6), *extra]
    if launch(flags, args.threads, run_dir + ".log"):
        raise SystemExit(f"timing run {algo} failed; see {run_dir}.log")
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    config = json.load(open(os.path.join(run_dir, "config.json")))
    return steady_ms_per_image(rows, config["value_warmup"] + 1 if algo == "ppo" else 1)


def read(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    evals = [r for r in rows if "eval/heldout_strict" in r]
    last = rows[-1]
    tail = [r for r in rows[-5:] if any(k.startswith("critic/ev_noise_") for k in r)]
    ev = {k[len("critic/ev_noise_"):]: sum(r[k] for r in tail) / len(tail) for k in tail[-1] if k.startswith("critic/ev_noise_")} if tail else {}
    return {"images": [r["images"] for r in evals], "heldout_strict": [r["eval/heldout_strict"] for r in evals],
            "heldout_score": [r["eval/heldout_score"] for r in evals],
            "train_reward": [[r["images"], r["reward/train/total_raw"]] for r in rows if "reward/train/total_raw" in r],
            "wall_s_per_image": last["time/total_train_s"] / last["images"], "train_wall_s": last["time/total_train_s"],
            "steady_ms_per_image": steady_ms_per_image(rows, 5),
            "critic_ev_by_noise_last5": ev,
            "critic_ev_last5": (sum(r["critic/explained_variance"] for r in tail) / len(tail)) if tail else None}


def mean(xs):
    return sum(xs) / len(xs)


def se(xs):
    """Standard error of the mean over seeds."""
    if len(xs) < 2:
        return float("nan")
    m = mean(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) ** 0.5


def add_prompt_accuracy(args, curves):
    """The base model's and each run's final policy's accuracy on both prompt splits."""
    seeds = range(args.eval_seeds)
    accuracy = {"base": prompt_accuracy(args.model, seeds, os.path.join(args.runs, f"base-{os.path.basename(args.model)}-accuracy.json"))}
    for algo in ALGOS:
        accuracy[algo] = {s: prompt_accuracy(os.path.join(args.runs, f"{algo}-seed{s}", "pipeline"), seeds,
                                             os.path.join(args.runs, f"{algo}-seed{s}", "prompt_accuracy.json"))
                          for s in curves[algo]}
    return accuracy


def summarise(curves, seeds, timed=None, accuracy=None):
    """Per algorithm: the seed-mean curve, final accuracy, time per image; and the images
    critic-PPO needs to reach GRPO's final accuracy (first eval where the seed mean gets there)."""
    out = {}
    for algo in ALGOS:
        runs = [curves[algo][str(s)] for s in seeds]
        images = runs[0]["images"]
        acc = [mean([r["heldout_strict"][i] for r in runs]) for i in range(len(images))]
        out[algo] = {"images": images, "heldout_strict_mean": acc, "base": acc[0], "final": acc[-1],
                     "final_se": se([r["heldout_strict"][-1] for r in runs]),
                     "final_per_seed": [r["heldout_strict"][-1] for r in runs],
                     "wall_s_per_image": mean([r["wall_s_per_image"] for r in runs]),
                     "steady_ms_per_image_learning_runs": mean([r["steady_ms_per_image"] for r in runs]),
                     "steady_ms_per_image_alone": (timed or {}).get(algo)}
        if accuracy:
            for split in ("train", "heldout"):
                for kind in ("category_mean", "prompt_mean"):
                    per_seed = [accuracy[algo][str(s)][split][kind] for s in seeds]
                    out[algo][f"final_{split}_{kind}"] = mean(per_seed)
                    out[algo][f"final_{split}_{kind}_per_seed"] = per_seed
                    out[algo][f"base_{split}_{kind}"] = accuracy["base"][split][kind]
                out[algo][f"final_{split}_by_category"] = {c: mean([accuracy[algo][str(s)][split]["by_category"][c] for s in seeds])
                                                           for c in accuracy["base"][split]["by_category"]}
                out[algo][f"base_{split}_by_category"] = accuracy["base"][split]["by_category"]
    ppo, grpo = out["ppo"], out["grpo"]
    reach = next((n for n, a in zip(ppo["images"], ppo["heldout_strict_mean"]) if n > 0 and a >= grpo["final"]), None)
    runs = [curves["ppo"][str(s)]["critic_ev_by_noise_last5"] for s in seeds]
    time_ratio = timed["ppo"] / timed["grpo"] if timed else ppo["wall_s_per_image"] / grpo["wall_s_per_image"]
    out["comparison"] = {
        "ppo_images_to_reach_grpo_final": reach, "total_images": grpo["images"][-1],
        "time_ratio_ppo_over_grpo": time_ratio,
        "time_ratio_source": "timing runs, one algorithm alone, steady-state median" if timed else
                             "learning runs (total training time / images)",
        "critic_ev_by_noise_last5": {k: mean([r[k] for r in runs]) for k in runs[0]} if runs[0] else {},
        "targets": {"ppo_final_at_least_0.9": ppo["final"] >= 0.9,
                    # only meaningful if GRPO got anywhere: reaching a final below the base model is no result
                    "ppo_reaches_grpo_final_with_half_the_images": reach is not None and reach <= grpo["images"][-1] / 2
                                                                   and grpo["final"] > grpo["base"],
                    "ppo_time_per_image_at_most_1.5x": time_ratio <= 1.5}}
    return out


def plot(curves, summary, seeds, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    splits = "final_train_category_mean" in summary["ppo"]
    fig, axes = plt.subplots(1, 3 if splits else 2, figsize=(15 if splits else 11, 4),
                             gridspec_kw={"width_ratios": [3, 1, 1.5] if splits else [3, 1]})
    ax, bx = axes[:2]
    for algo in ALGOS:
        color = COLORS[algo]
        for s in seeds:
            c = curves[algo][str(s)]
            ax.plot(c["images"], c["heldout_strict"], color=color, alpha=0.25, lw=1)
        m = summary[algo]
        ax.plot(m["images"], m["heldout_strict_mean"], color=color, lw=2, marker="o", ms=3,
                label=f"{LABELS[algo]}, mean of {len(seeds)} seeds")
    ax.set_xlabel("images generated"), ax.set_ylabel("held-out strict accuracy"), ax.grid(alpha=0.3), ax.legend()
    ax.set_title("built-in world, tiny-dit: held-out accuracy vs images")
    per_image = [summary[a]["steady_ms_per_image_alone"] or summary[a]["wall_s_per_image"] * 1000 for a in ALGOS]
    bx.bar([LABELS[a].split(" ")[0] for a in ALGOS], per_image, color=[COLORS[a] for a in ALGOS])
    bx.set_ylabel("training wall time per image (ms, 1 CPU thread)"), bx.grid(alpha=0.3, axis="y")
    if splits:      # sharpening (training prompts) against generalisation (held-out ones)
        cx, width = axes[2], 0.2
        bars = [("base", "black", "ppo", "base_")] + [(LABELS[a].split(" ")[0], COLORS[a], a, "final_") for a in ALGOS]
        for k, (label, color, algo, key) in enumerate(bars):
            cx.bar([i + (k - 1.5) * width for i in range(2)],
                   [summary[algo][f"{key}{split}_category_mean"] for split in ("train", "heldout")], width, color=color, label=label)
        cx.set_xticks(range(2), ["training prompts", "held-out prompts"]), cx.grid(alpha=0.3, axis="y")
        cx.set_ylabel("strict accuracy (category mean)"), cx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summary, train_tags=None):
    """The section's main table; train_tags: the categories RL trained on, when not all of them."""
    algos, c = [summary[a] for a in ALGOS], summary["comparison"]
    row = lambda name, f: f"| {name} | " + " | ".join(f(m) for m in algos) + " |"
    lines = ["| | " + " | ".join(LABELS[a] for a in ALGOS) + " |", "|---|" + "---|" * len(ALGOS),
             row("held-out strict accuracy, base model", lambda m: f"{m['base']:.3f}"),
             row(f"held-out strict accuracy after {algos[0]['images'][-1]} images (mean ± s.e. over seeds)",
                 lambda m: f"{m['final']:.3f} ± {m['final_se']:.3f}"),
             row("per seed", lambda m: ", ".join(f"{a:.3f}" for a in m["final_per_seed"])),
             row("training wall time per image, learning runs (ms, total / images)",
                 lambda m: f"{m['wall_s_per_image'] * 1000:.1f}")]
    if algos[0]["steady_ms_per_image_alone"]:                                                  # timing runs only
        lines.append(row("training wall time per image, alone, steady state (ms)",
                         lambda m: f"{m['steady_ms_per_image_alone']:.1f}"))
    lines += [f"| time ratio critic-PPO / GRPO ({c['time_ratio_source']}) | {c['time_ratio_ppo_over_grpo']:.2f} |"
              + " - |" * (len(ALGOS) - 1),
              f"| images for critic-PPO to reach GRPO's final accuracy | {c['ppo_images_to_reach_grpo_final'] or 'not reached'} |"
              + " - |" * (len(ALGOS) - 1)]
    seen = f"RL saw the {', '.join(f'`{t}`' for t in train_tags)} ones" if train_tags else "RL saw them"
    for split, name in (("train", f"training prompts ({seen})"), ("heldout", "held-out prompts")):
        if f"final_{split}_category_mean" in algos[0]:
            cell = lambda m, k: f"{m[k + '_category_mean']:.3f} ({m[k + '_prompt_mean']:.3f})"
            lines += [row(f"{name}, base model, category mean (prompt mean)", lambda m: cell(m, "base_" + split)),
                      row(f"{name}, final policies, category mean (prompt mean)", lambda m: cell(m, "final_" + split))]
    if c["critic_ev_by_noise_last5"]:
        lines.append("| critic explained variance by noise fraction (last 5 iterations) | "
                     + ", ".join(f"{k}: {v:+.2f}" for k, v in c["critic_ev_by_noise_last5"].items()) + " |"
                     + " - |" * (len(ALGOS) - 1))
    return "\n".join(lines)


def category_table(summary):
    """Strict accuracy per category and split: base model, then each algorithm's mean over seeds."""
    first = summary[ALGOS[0]]
    if "final_train_by_category" not in first:                       # a JSON from before the per-category figures
        return ""
    lines = ["| category | split | base model | " + " | ".join(LABELS[a] for a in ALGOS) + " |",
             "|---|---|---|" + "---|" * len(ALGOS)]
    for category in first["base_train_by_category"]:
        for split, name in (("train", "training"), ("heldout", "held-out")):
            lines.append(f"| {category} | {name} | {first[f'base_{split}_by_category'][category]:.3f} | "
                         + " | ".join(f"{summary[a][f'final_{split}_by_category'][category]:.3f}" for a in ALGOS) + " |")
    return "\n".join(lines)


def main():
    argv, extra = split_train_flags(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p, "ppo_vs_grpo", eval_every=10, jobs=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds, the same for every algorithm")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "ppo_vs_grpo"), help="output prefix (.json, .png)")
    p.add_argument("--timing-images", type=int, default=640,
                   help="images per algorithm in separate timing runs, one algorithm at a time (0 = skip)")
    p.add_argument("--label", default="", help="added to the section's title: what sets this section apart")
    p.add_argument("--ppo-flags", default="", help="train.py flags for the critic-PPO runs only, e.g. "
                   "'--critic-replay 32 --critic-terminal' (the critic's flags, which GRPO and RAFT refuse)")
    args = p.parse_args(argv)
    os.makedirs(args.runs, exist_ok=True)
    jobs = [(algo, s) for s in args.seeds for algo in ALGOS]
    if not args.report_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: run_one(args, *job, extra), jobs))
    command = "python bench/ppo_vs_grpo.py " + shlex.join(sys.argv[1:])
    if args.report_only and os.path.isfile(args.out + ".json"):       # keep the command that made the runs
        previous = json.load(open(args.out + ".json"))
        command, extra = previous["command"], previous["train_flags"]
        args.seeds = [int(s) for s in previous["curves"]["ppo"]]       # and its seeds
        args.jobs, args.threads = previous["jobs"], previous["threads_per_run"]
        args.eval_seeds = previous.get("eval_seeds", args.eval_seeds)
        args.label = args.label or previous.get("label", "")
        args.ppo_flags = previous.get("ppo_flags", "")
    curves = {algo: {str(s): read(os.path.join(args.runs, f"{algo}-seed{s}")) for s in args.seeds} for algo in ALGOS}
    timed_path = os.path.join(args.runs, "timing.json")
    if args.timing_images and not args.report_only:
        timed = {algo: timing(args, algo, own_flags(args, algo, extra)) for algo in ALGOS}
        with open(timed_path, "w") as f:
            json.dump(timed, f)
    timed = json.load(open(timed_path)) if os.path.isfile(timed_path) else None
    accuracy = add_prompt_accuracy(args, curves)
    config = json.load(open(os.path.join(args.runs, f"ppo-seed{args.seeds[0]}", "config.json")))
    train_tags = config.get("train_tags") and config["train_tags"].split(",")   # the categories RL trained on, if not all
    summary = summarise(curves, args.seeds, timed, accuracy)
    spec = {"images": summary["ppo"]["images"], "base_heldout_strict": summary["ppo"]["base"],
            **{a: {"heldout_strict": [curves[a][str(s)]["heldout_strict"] for s in args.seeds],
                   "time_per_image_ms": [curves[a][str(s)]["wall_s_per_image"] * 1000 for s in args.seeds]}
               for a in ALGOS}}
    write_json(args.out, {**spec, "command": command, "train_flags": extra, "ppo_flags": args.ppo_flags, "threads_per_run": args.threads, "jobs": args.jobs,
                          "eval_seeds": args.eval_seeds, "label": args.label, "summary": summary, "prompt_accuracy": accuracy,
                          "curves": curves})
    plot(curves, summary, args.seeds, args.out + ".png")
    if os.path.dirname(os.path.abspath(args.out)) == RESULTS:      # bench/results/NAME owns the section NAME
        name, targets = os.path.basename(args.out), summary["comparison"]["targets"]
        categories = category_table(summary)
        write_section(name.replace("_", "-"), "\n".join([
            f"## Critic-PPO vs GRPO vs RAFT on the built-in world ({summary['grpo']['images'][-1]} images per run, equal seeds"
            + (f"; {args.label}" if args.label else "") + ")", "",
            f"Command: `{command}` (tiny-dit, shapes reward, {len(args.seeds)} seeds, "
            f"{args.threads} thread per run, {args.jobs} runs at once; held-out prompts x {args.eval_seeds} seeds, "
            "deterministic sampler; train.py flags: `" + (" ".join(extra) or "defaults") + "`"
            + (f", and for critic-PPO also `{args.ppo_flags}`" if args.ppo_flags else "") + ")", "",
            table(summary, train_tags), "", *([categories, ""] if categories else []),
            f"![held-out accuracy vs images](bench/results/{name}.png)", "",
            "Targets: " + ", ".join(f"{k}: {'met' if v else 'missed'}" for k, v in targets.items())
            + ("" if summary["grpo"]["final"] > summary["grpo"]["base"] else
               " (GRPO ended at or below the base model, so 'reaching' it is no result)") + "."]))
    print(table(summary, train_tags))
    print(json.dumps(summary["comparison"]["targets"]))
    print(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
