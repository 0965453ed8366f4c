"""Reward hacking and its remedy on the built-in world (arXiv 2605.27736, section 6), in two suites.

--suite learned (the default; the paper's case): critic-PPO on tiny-dit with the world's *learned* rewards,
`toy-pref` alone (a preference model with a rater's taste, as HPS and PickScore are), `toy-clip` alone, and
both at once (`joint`, weights 1,1; `--names joint-clip2`: weights 1,2), several seeds each. The checker
(`shapes`) is the gold metric and never a training reward: every run reports, along the run on the held-out
prompts with the deterministic sampler, the gold strict accuracy and both learned rewards' scores (the one not
trained on is scored as a monitor), and its final policy's strict accuracy per category of prompt. Hacking
is a reward's own score rising while gold accuracy falls from its peak; the paper's remedy holds if the joint
run keeps each score's gain and more gold accuracy. Writes bench/results/reward_hacking_learned.json
({"images", "base_gold", "runs": {NAME: {"rewards", "gold_heldout_strict": [[seed][point]], "scores":
{REWARD: [[seed][point]]}}}}), .png (the curves) and _grid.png (each run's final samples, seed 0), and the
BENCHMARKS.md section reward-hacking-learned. `--taste T` is the control that separates the reward from the
method: toy-pref made again (pretrain.py --model toy-pref --taste T, into the runs' folder) with a rater whose
taste for red and yellow objects weighs T against the checker's partial credit (the shipped toy-pref: 2), and the
runs trained on it, under the suffix _tasteT.

--suite jpeg (DDPO's compressibility experiment): `--rewards jpeg` alone, `shapes` alone and `shapes,jpeg` at
weights 1,1, 1,0.5 and 1,0.2, one seed: on this world a JPEG shrinks most by drawing less, which the checker
penalises, so the two rewards conflict directly (bench/results/reward_hacking.json and its section).

Run:  python bench/reward_hacking.py --seeds 0 1 2 3 4          # the learned suite, 2 runs at a time
      python bench/reward_hacking.py --suite learned --report-only
      python bench/reward_hacking.py --taste 0.5 --seeds 0 1 2 3 4    # the control: a milder taste
      python bench/reward_hacking.py --suite jpeg --images 5120 -- --lr 1e-3     (flags after -- go to train.py)
"""
import argparse
import json
import math
import os
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor

from common import (RESULTS, ROOT, add_run_args, last_quarter, launch, mean, pm, prompt_accuracy, se, split_train_flags,
                    train_run, write_json, write_section)

LEARNED = {  # name -> train.py reward flags: the learned suite (the checker is gold, never trained on)
    "pref": ["--rewards", "toy-pref", "--monitor-rewards", "toy-clip"],
    "clip": ["--rewards", "toy-clip", "--monitor-rewards", "toy-pref"],
    "joint": ["--rewards", "toy-pref,toy-clip", "--reward-weights", "1,1"],
    # a lever for the joint target, run only when named: toy-clip, the reward the policy does not hack, weighs more
    "joint-clip2": ["--rewards", "toy-pref,toy-clip", "--reward-weights", "1,2"],
}
SUITE = ("pref", "clip", "joint")     # the learned suite's runs when --names is not given
SCORED = ("toy-pref", "toy-clip")
RUNS = {  # name -> train.py reward flags: the jpeg suite
    "jpeg": ["--rewards", "jpeg", "--monitor-rewards", "shapes"],
    "shapes": ["--rewards", "shapes", "--monitor-rewards", "jpeg"],
    "shapes,jpeg": ["--rewards", "shapes,jpeg", "--reward-weights", "1,1"],
    "shapes,jpeg weights 1,0.5": ["--rewards", "shapes,jpeg", "--reward-weights", "1,0.5"],
    "shapes,jpeg weights 1,0.2": ["--rewards", "shapes,jpeg", "--reward-weights", "1,0.2"],
}


def slug(name):
    return name.replace(",", "+").replace(" ", "_")


def run_one(args, name, extra):
    return train_run(args, os.path.join(args.runs, slug(name)),
                     ["--algo", "ppo", "--seed", str(args.seed), *RUNS[name], *extra], name)


def read(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    evals = [r for r in rows if "eval/heldout_strict" in r]
    pick = lambda r: {"images": r["images"], "heldout_strict": r["eval/heldout_strict"],
                      "heldout_partial": r["eval/heldout_score"], "jpeg_kb": -r["eval/heldout_jpeg"]}
    return {"base": pick(evals[0]), "final": pick(evals[-1]), "curve": [pick(r) for r in evals]}


def category_prompts(split=None):
    """{category: how many prompts} of the world (or of one split), in toy.TAGS order."""
    import toy
    metas = toy.all_prompts() if split is None else toy.prompts(split)
    return {c: sum(m["tag"] == c for m in metas) for c in toy.TAGS}


def by_category(accuracy):
    """{category: strict accuracy over all its prompts, training and held-out} from common.prompt_accuracy's splits."""
    split = {s: category_prompts(s) for s in ("train", "heldout")}
    return {c: sum(accuracy[s]["by_category"].get(c, 0.0) * split[s][c] for s in split) / n
            for c, n in category_prompts().items()}


def grid(run_dirs, path):
    """The final sample grid of each run under the base model's, one labelled row each."""
    from PIL import Image, ImageDraw
    first = next(iter(run_dirs.values()))
    last = lambda d: os.path.join(d, "samples", sorted(f for f in os.listdir(os.path.join(d, "samples"))
                                                          if f.startswith("iter_"))[-1])
    rows = [("base model", os.path.join(first, "samples", "iter_0000.png"))]
    rows += [(f"trained on {name}", last(d)) for name, d in run_dirs.items()]
    images = [Image.open(p).convert("RGB") for _, p in rows]
    label_w, w, h = 190, images[0].width, images[0].height
    out = Image.new("RGB", (label_w + w, h * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    for i, ((label, _), im) in enumerate(zip(rows, images)):
        out.paste(im, (label_w, i * h))
        draw.text((6, i * h + h // 2 - 6), label, fill="black")
    prompts = open(os.path.join(first, "samples", "prompts.txt")).read().split("\n")
    out.save(path)
    return [p for p in prompts if p]


STEER_N, STEER_SEEDS = 8, 8      # the steering sweep: best-of-8 by the critic, held-out prompts x 8 seeds
STEER_KEYS = (*SCORED, "shapes/strict")      # what the sweep reports of the chosen images


def steer_sweep(args, run_dir, reward_path=()):
    """The per-reward heads' reason to exist: one trained joint policy and critic, steered at inference
    by `python eval.py --steer bon --steer-weights toy-pref=1,toy-clip=w` for each w of
    --steer-clip-weights; every reward (toy-pref from `reward_path`, eval.py's --reward-path flags, when the
    runs trained on another taste's) and the gold scored on the chosen images. Each evaluation is
    kept under the runs (reused when there). Every weight chooses among the same N candidates of each
    prompt and seed, so each row also has its paired difference from the first weight's choices.
    Returns {"run", "command", "rows": [{"w", REWARD: {mean, se}, "paired": {REWARD: {mean, se}}}],
    "unsteered": {REWARD: {mean, se}}}."""
    flags = lambda run, weight, to: ["--policy", run, "--critic", run, "--steer", "bon", "--n", str(STEER_N),
                                     "--steer-weights", f"toy-pref=1,toy-clip={weight}", "--rewards",
                                     "toy-pref,toy-clip,shapes", "--seeds", str(STEER_SEEDS), *reward_path,
                                     "--out", to]
    rows, unsteered, first = [], None, None
    for w in args.steer_clip_weights:
        out = os.path.join(args.runs, f"steer-{os.path.basename(run_dir)}-clip{w:g}")
        if not os.path.isfile(os.path.join(out, "summary.json")) and not args.report_only:
            if launch(flags(run_dir, f"{w:g}", out), args.threads, out + ".log", script="eval.py"):
                raise SystemExit(f"steering with toy-clip weight {w:g} failed; see {out}.log")
        if os.path.isfile(os.path.join(out, "summary.json")):
            summary = json.load(open(os.path.join(out, "summary.json")))
            images = {(r["prompt"], r["seed"]): r for r in json.load(open(os.path.join(out, "results.json")))["images"]}
            first = first or images
            paired = {k: [float(images[i][k]) - float(first[i][k]) for i in first] for k in STEER_KEYS}
            rows.append({"w": w, **{k: summary[k] for k in STEER_KEYS},
                         "paired": {k: {"mean": mean(d), "se": se(d)} for k, d in paired.items()}})
            unsteered = unsteered or {k: summary["unsteered"][k] for k in STEER_KEYS}
    command = "python " + shlex.join(["eval.py", *flags("RUN", "W", "OUT")])
    return {"run": os.path.basename(run_dir), "command": command, "rows": rows, "unsteered": unsteered} if rows else None


def learned(args, extra):
    """The learned suite: run (or reuse, or resume) every name x seed, then the JSON, curves, grid and section."""
    names = [n for n in LEARNED if n in (args.names or SUITE)]             # trained now; every finished run is reported
    runs = {n: {s: os.path.join(args.runs, f"{n}-seed{s}") for s in args.seeds} for n in LEARNED}
    pref_path = []                                 # --reward-path of the toy-pref trained on, when not the shipped one
    if args.taste is not None:                     # the control: a toy-pref of another taste, made here once
        pref = os.path.join(args.runs, "toy-pref")
        if not os.path.isdir(pref) and not args.report_only:
            os.makedirs(args.runs, exist_ok=True)
            if launch(["--model", "toy-pref", "--taste", f"{args.taste:g}", "--out", pref], args.threads,
                      pref + ".log", script="pretrain.py"):
                raise SystemExit(f"pretrain.py --model toy-pref --taste {args.taste:g} failed; see {pref}.log")
        made = json.load(open(os.path.join(pref, "config.json"))).get("taste") if os.path.isdir(pref) else args.taste
        if made != args.taste:
            raise SystemExit(f"{pref} holds a toy-pref of taste {made}, not {args.taste:g}: another --runs for this taste")
        pref_path = ["--reward-path", f"toy-pref={os.path.relpath(pref, ROOT)}"]   # train.py and eval.py run in ROOT
        extra = [*extra, *pref_path]
    previous = json.load(open(args.out + ".json")) if os.path.isfile(args.out + ".json") else {}
    if not args.steer_clip_weights:                                # keep a steering sweep made before
        args.steer_clip_weights = [r["w"] for r in (previous.get("steering") or {}).get("rows", [])]
    flags = lambda n, s: ["--algo", "ppo", "--seed", str(s), *LEARNED[n], *extra]
    if not args.report_only:
        os.makedirs(args.runs, exist_ok=True)
        jobs = [(n, s) for s in args.seeds for n in names]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: train_run(args, runs[job[0]][job[1]], flags(*job), f"{job[0]} seed {job[1]}"), jobs))
    out, images, base = {}, None, None
    for n, by_seed in runs.items():
        done = {s: d for s, d in by_seed.items() if os.path.isdir(os.path.join(d, "pipeline"))}
        if not done:
            continue
        evals = {s: [r for r in map(json.loads, open(os.path.join(d, "metrics.jsonl"))) if "eval/heldout_strict" in r]
                 for s, d in done.items()}
        images = [r["images"] for r in next(iter(evals.values()))]
        base = next(iter(evals.values()))[0]["eval/heldout_strict"]
        out[n] = {"rewards": " ".join(LEARNED[n]), "seeds": sorted(done),
                  "gold_heldout_strict": [[r["eval/heldout_strict"] for r in evals[s]] for s in sorted(done)],
                  "scores": {k: [[r[f"eval/heldout_{k}"] for r in evals[s]] for s in sorted(done)] for k in SCORED}}
    if not out:
        raise SystemExit(f"no finished runs under {args.runs}")
    # what each hack breaks: the final policies' strict accuracy per category over all the world's prompts
    # (training and held-out), the deterministic sampler at the evaluation's seeds; cached in each run
    seeds = range(args.eval_seeds)
    base_cat = by_category(prompt_accuracy(args.model, seeds,
                                           os.path.join(args.runs, f"base-{os.path.basename(args.model)}-accuracy.json")))
    for n, r in out.items():
        per_seed = [by_category(prompt_accuracy(os.path.join(runs[n][s], "pipeline"), seeds,
                                                os.path.join(runs[n][s], "prompt_accuracy.json"))) for s in r["seeds"]]
        r["final_strict_by_category"] = {c: [a[c] for a in per_seed] for c in per_seed[0]}
    name = os.path.basename(args.out)
    ran = shlex.join(a for a in sys.argv[1:] if a != "--report-only")           # the command that made the runs
    steering = steer_sweep(args, runs["joint"][min(out["joint"]["seeds"])], pref_path) if "joint" in out else None
    if steering is None and args.report_only:                      # its evaluations are gone: the recorded sweep
        steering = previous.get("steering")
    write_json(args.out, {"images": images, "base_gold": base, "base_strict_by_category": base_cat,
                          "train_flags": extra, "runs": out,
                          "command": f"python bench/reward_hacking.py {ran}".strip(), "steering": steering})
    curve = lambda per_seed: [mean(p) for p in zip(*per_seed)]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for n, r in out.items():
        for ax, per_seed in zip(axes, (r["gold_heldout_strict"], *(r["scores"][k] for k in SCORED))):
            ax.plot(images, curve(per_seed), marker="o", ms=2, label=f"{n} ({len(r['seeds'])} seeds)")
    for ax, title in zip(axes, ("gold: the checker's held-out strict accuracy", *(f"{k} score, held-out" for k in SCORED))):
        ax.set_title(title), ax.set_xlabel("training images"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.tight_layout(), fig.savefig(args.out + ".png", dpi=110), plt.close(fig)
    grid({n: runs[n][min(out[n]["seeds"])] for n in out}, args.out + "_grid.png")
    lines = [f"Command: `python bench/reward_hacking.py {ran}` (critic-PPO on tiny-dit, "
             f"{images[-1]:,} images per run, train.py flags `{' '.join(extra)}`; held-out prompts x {args.eval_seeds} "
             f"seeds, deterministic sampler). Gold of the base model: {base:.3f}.", "",
             "| run | seeds | gold: final | gold: last quarter's evaluations | gold: peak along the run | "
             + " | ".join(f"{k}: base -> last quarter" for k in SCORED) + " |",
             "|---|---|---|---|---|" + "---|" * len(SCORED)]
    for n, r in out.items():
        g = r["gold_heldout_strict"]
        finals, lasts, peaks = [s[-1] for s in g], [last_quarter(images, s) for s in g], [max(s) for s in g]
        cells = [f"{mean([s[0] for s in r['scores'][k]]):.4f} -> {mean([last_quarter(images, s) for s in r['scores'][k]]):.4f}"
                 for k in SCORED]
        lines.append(f"| {n} | {len(g)} | {pm(finals)} | {pm(lasts)} | {mean(peaks):.3f} | " + " | ".join(cells) + " |")
    lines += ["", f"![curves](bench/results/{name}.png)", "", f"![final samples, seed 0](bench/results/{name}_grid.png)",
              "", "What each run's final policy draws right, by category: strict accuracy over all the world's "
              "prompts of the category (training and held-out; how many in brackets), the evaluation's sampler and "
              "seeds; mean ± s.e. over the run's seeds.", "",
              "| run | " + " | ".join(f"{c.replace('_', ' ')} ({n})" for c, n in category_prompts().items()) + " |",
              "|---|" + "---|" * len(base_cat),
              "| base model | " + " | ".join(f"{v:.3f}" for v in base_cat.values()) + " |"]
    lines += [f"| {n} | " + " | ".join(pm(r["final_strict_by_category"][c]) for c in base_cat) + " |" for n, r in out.items()]
    if steering:
        cell = lambda v: f"{v['mean']:.4f} ± {v['se']:.4f}"
        lines += ["", f"Steering with the per-reward heads, no retraining: the `joint` run's policy and critic "
                  f"({steering['run']}), `{steering['command']}` (best of {STEER_N} by the critic's weighted heads, "
                  f"held-out prompts x {STEER_SEEDS} seeds; mean ± s.e. over images, and in brackets the paired "
                  f"difference from w = {steering['rows'][0]['w']:g}'s choices among the same candidates):", "",
                  "| toy-clip head weight w (toy-pref 1) | " + " | ".join(SCORED) + " | gold strict |", "|---|---|---|---|",
                  "| unsteered | " + " | ".join(cell(steering["unsteered"][k]) for k in STEER_KEYS) + " |"]
        lines += [f"| {r['w']:g} | " + " | ".join(
            cell(r[k]) + (f" ({r['paired'][k]['mean']:+.4f} ± {r['paired'][k]['se']:.4f})" if i else "")
            for k in STEER_KEYS) + " |" for i, r in enumerate(steering["rows"])]
    if os.path.dirname(os.path.abspath(args.out)) == RESULTS:          # bench/results/NAME owns the section NAME
        title = ("toy-pref, toy-clip and both" if args.taste is None else
                 f"the control, a toy-pref whose rater's taste weighs {args.taste:g} (the shipped one: 2)")
        write_section(name.replace("_", "-"), f"## Reward hacking with the world's learned rewards: {title}\n\n"
                      + "\n".join(lines))
    print("\n".join(lines))


def main():
    argv, extra = split_train_flags(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p, "reward_hacking", eval_every=20, jobs=2)
    p.add_argument("--suite", choices=("learned", "jpeg"), default="learned", help="which experiment (the docstring)")
    p.add_argument("--seed", type=int, default=0, help="jpeg suite: seed of every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="learned suite: seeds of every run")
    p.add_argument("--names", nargs="+", choices=list(RUNS) + list(LEARNED), default=None, metavar="NAME",
                   help="which runs (default: learned suite " + ", ".join(SUITE) + " (also: " + ", ".join(
                       n for n in LEARNED if n not in SUITE) + "); jpeg suite all: "
                        + "; ".join(RUNS) + ")")
    p.add_argument("--taste", type=float, default=None,
                   help="learned suite, the control that separates the reward from the method: toy-pref made again "
                        "by pretrain.py --taste T (the rater's weight on red and yellow objects; shipped: 2) and "
                        "trained on; runs, JSON and section get the suffix _tasteT")
    p.add_argument("--steer-clip-weights", type=float, nargs="*", default=[],
                   help="learned suite: also steer the joint run (its lowest seed) with eval.py --steer bon "
                        "--steer-weights toy-pref=1,toy-clip=W for each W (the heads' trade-off without retraining)")
    p.add_argument("--out", default=None, help="output prefix (.json, .png; default bench/results/reward_hacking, "
                                                "or reward_hacking_learned for the learned suite)")
    args = p.parse_args(argv)
    bad = [w for w in args.steer_clip_weights if not math.isfinite(w) or w < 0]
    if bad:
        p.exit(2, f"error: --steer-clip-weights must be finite and >= 0, got {bad[0]:g}\n")
    if args.out and not os.path.dirname(args.out):        # a bare name goes where write_json puts it
        args.out = os.path.join(RESULTS, args.out)
    if args.taste is not None and (args.suite != "learned" or not math.isfinite(args.taste) or args.taste < 0):
        p.exit(2, f"error: --taste is a finite weight >= 0 of the learned suite, got {args.taste:g}\n")
    wrong = [n for n in args.names or [] if n not in (LEARNED if args.suite == "learned" else RUNS)]
    if wrong:
        p.exit(2, f"error: --names {wrong[0]} is not a run of the {args.suite} suite\n")
    if args.suite == "learned":
        suffix = "" if args.taste is None else f"_taste{args.taste:g}"
        args.out = args.out or os.path.join(RESULTS, "reward_hacking_learned" + suffix)
        if args.runs.endswith("reward_hacking"):
            args.runs += "_learned" + suffix
        if "--images" not in argv:
            args.images = 20480                               # the credit benchmark's budget and schedule
        return learned(args, extra or ["--lr-schedule", "constant", "--lr", "3e-4"])
    args.out = args.out or os.path.join(RESULTS, "reward_hacking")
    os.makedirs(args.runs, exist_ok=True)
    names = args.names or list(RUNS)
    if args.report_only:
        run_dirs = {n: os.path.join(args.runs, slug(n)) for n in names}
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            run_dirs = dict(zip(names, pool.map(lambda n: run_one(args, n, extra), names)))
    command = "python bench/reward_hacking.py " + shlex.join(sys.argv[1:])
    if args.report_only and os.path.isfile(args.out + ".json"):         # keep the command that made the runs
        previous = json.load(open(args.out + ".json"))
        command, extra, args.images = previous["command"], previous["train_flags"], previous["images"]
        args.eval_seeds = previous.get("eval_seeds", args.eval_seeds)
    results = {n: read(d) for n, d in run_dirs.items()}
    seeds = range(args.eval_seeds)
    base_acc = prompt_accuracy(args.model, seeds, os.path.join(args.runs, f"base-{os.path.basename(args.model)}-accuracy.json"))
    for n, d in run_dirs.items():
        results[n]["final"]["prompt_accuracy"] = prompt_accuracy(os.path.join(d, "pipeline"), seeds,
                                                                 os.path.join(d, "prompt_accuracy.json"))
    name = os.path.basename(args.out)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    prompts = grid(run_dirs, args.out + ".png")
    write_json(args.out, {"command": command, "train_flags": extra, "seed": args.seed, "images": args.images,
                          "eval_seeds": args.eval_seeds, "base_prompt_accuracy": base_acc, "results": results,
                          "grid_prompts": prompts})
    base = results[names[0]]["base"]
    train_acc = lambda acc: f"{acc['train']['category_mean']:.3f} ({acc['train']['prompt_mean']:.3f})"
    lines = [f"Command: `{command}` (critic-PPO, tiny-dit, seed {args.seed}, {args.images} images per run, "
             f"held-out prompts x {args.eval_seeds} seeds, deterministic sampler; training prompts judged "
             "after the run with the same sampler and seeds)", "",
             "| rewards trained on | held-out strict accuracy | partial credit | mean JPEG size (kB, q95) "
             "| training prompts: strict accuracy, category mean (prompt mean) |",
             "|---|---|---|---|---|",
             f"| (base model) | {base['heldout_strict']:.3f} | {base['heldout_partial']:.3f} | {base['jpeg_kb']:.2f} "
             f"| {train_acc(base_acc)} |"]
    for n in names:
        f, (rewards, _, weights) = results[n]["final"], n.partition(" ")     # "shapes,jpeg weights 1,0.5"
        lines.append(f"| `{rewards}`{' ' + weights if weights else ''} | {f['heldout_strict']:.3f} | "
                     f"{f['heldout_partial']:.3f} | {f['jpeg_kb']:.2f} | {train_acc(f['prompt_accuracy'])} |")
    lines += ["", f"![final samples of each run](bench/results/{name}.png)", "",
              "Grid columns, left to right: " + "; ".join(f"\"{p}\"" for p in prompts) + "."]
    if os.path.dirname(os.path.abspath(args.out)) == RESULTS:          # bench/results/NAME owns the section NAME
        runs = " vs ".join(f"`{n}`" for n in names)
        write_section(name.replace("_", "-"), f"## Reward hacking: {runs} ({args.images} images per run)\n\n"
                      + "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
