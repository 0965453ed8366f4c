"""Reward hacking and its remedy on the built-in world (arXiv 2605.27736, section 6; DDPO's
compressibility experiment): critic-PPO with `--rewards jpeg` alone, `shapes` alone and
`shapes,jpeg` (normalised, at weights 1,1, 1,0.5 and 1,0.2), same seed, same number of images.

Each run is train.py (tiny-dit, CPU, one thread); the reward it does not train on is scored as
a monitor, so every run reports, on the held-out prompts with the deterministic sampler:
  - strict accuracy of the world's checker (what `jpeg` alone ignores)
  - mean JPEG size in kB at quality 95 (what `jpeg` rewards shrinking: minus the `jpeg` reward)
for the base model (iteration 0) and after the budget, and each final policy's strict accuracy
on the training prompts (the same sampler and seeds). Writes bench/results/reward_hacking.json,
bench/results/reward_hacking.png (the final sample grid of each run, the base model on top) and
its section of BENCHMARKS.md (with --out bench/results/NAME: NAME.json, NAME.png, section NAME).

Run:  python bench/reward_hacking.py                       # the 5 runs of RUNS, 2 at a time
      python bench/reward_hacking.py --images 640 -- --lr 3e-4   (flags after -- go to train.py)
      python bench/reward_hacking.py --report-only
      python bench/reward_hacking.py --names jpeg shapes shapes,jpeg --images 20480 --batch-size 128 \
          --runs bench/runs/reward_hacking_8x --out bench/results/reward_hacking_8x -- ...
"""
import argparse
import json
import os
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor

from common import RESULTS, add_run_args, prompt_accuracy, split_train_flags, train_run, write_json, write_section

RUNS = {  # name -> train.py reward flags
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


def main():
    argv, extra = split_train_flags(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p, "reward_hacking", eval_every=20, jobs=2)
    p.add_argument("--seed", type=int, default=0, help="seed of every run")
    p.add_argument("--names", nargs="+", choices=list(RUNS), default=list(RUNS), metavar="NAME",
                   help="which runs (default all: " + "; ".join(RUNS) + ")")
    p.add_argument("--out", default=os.path.join(RESULTS, "reward_hacking"), help="output prefix (.json, .png)")
    args = p.parse_args(argv)
    os.makedirs(args.runs, exist_ok=True)
    names = args.names
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
