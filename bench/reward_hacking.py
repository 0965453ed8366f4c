"""Reward hacking and its remedy on the built-in world (arXiv 2605.27736, section 6; DDPO's
compressibility experiment): critic-PPO with `--rewards jpeg` alone, `shapes` alone and
`shapes,jpeg` (normalised, weights 1,1), same seed, same number of images.

Each run is train.py (tiny-dit, CPU, one thread); the reward it does not train on is scored as
a monitor, so every run reports, on the held-out prompts with the deterministic sampler:
  - strict accuracy of the world's checker (what `jpeg` alone ignores)
  - mean JPEG size in kB at quality 95 (what `jpeg` rewards shrinking: minus the `jpeg` reward)
for the base model (iteration 0) and after the budget. Writes bench/results/reward_hacking.json,
bench/results/reward_hacking.png (the final sample grid of each run, the base model on top) and
its section of BENCHMARKS.md.

Run:  python bench/reward_hacking.py                       # 3 runs, 2 at a time
      python bench/reward_hacking.py --images 640 -- --lr 3e-4   (flags after -- go to train.py)
      python bench/reward_hacking.py --report-only
"""
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from common import ROOT, write_json, write_section

RUNS = {  # name -> train.py reward flags
    "jpeg": ["--rewards", "jpeg", "--monitor-rewards", "shapes"],
    "shapes": ["--rewards", "shapes", "--monitor-rewards", "jpeg"],
    "shapes,jpeg": ["--rewards", "shapes,jpeg", "--reward-weights", "1,1"],
    "shapes,jpeg weights 1,0.2": ["--rewards", "shapes,jpeg", "--reward-weights", "1,0.2"],
}


def slug(name):
    return name.replace(",", "+").replace(" ", "_")


def run_one(args, name, extra):
    run_dir = os.path.join(args.runs, slug(name))
    if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")) and (
            os.path.isdir(os.path.join(run_dir, "pipeline")) or os.path.isdir(os.path.join(run_dir, "policy_lora"))):
        return run_dir                                  # finished before: reuse
    if os.path.isdir(os.path.join(run_dir, "checkpoint")):
        cmd = ["--resume", run_dir]
    else:
        import shutil
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = ["--model", args.model, "--algo", "ppo", "--seed", str(args.seed), "--run-dir", run_dir,
               "--iters", str(args.images // args.batch_size), "--batch-size", str(args.batch_size),
               "--eval-every", str(args.eval_every), "--eval-seeds", str(args.eval_seeds),
               "--sample-every", str(10 ** 6), "--save-every", "20", *RUNS[name], *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    with open(run_dir + ".log", "w") as log:
        code = subprocess.call([sys.executable, os.path.join(ROOT, "train.py"), *cmd], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"{name} failed (exit {code}); see {run_dir}.log")
    return run_dir


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
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-dit", help="base model (train.py --model)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run")
    p.add_argument("--images", type=int, default=2560, help="images generated per run")
    p.add_argument("--batch-size", type=int, default=32, help="images per iteration")
    p.add_argument("--eval-every", type=int, default=20, help="held-out evaluation every N iterations")
    p.add_argument("--eval-seeds", type=int, default=8, help="images per held-out prompt in each evaluation")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each on --threads threads)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--runs", default=os.path.join(ROOT, "bench", "runs", "reward_hacking"), help="where the runs go")
    p.add_argument("--report-only", action="store_true", help="only read finished runs")
    args = p.parse_args(argv)
    os.makedirs(args.runs, exist_ok=True)
    names = list(RUNS)
    if args.report_only:
        run_dirs = {n: os.path.join(args.runs, slug(n)) for n in names}
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            run_dirs = dict(zip(names, pool.map(lambda n: run_one(args, n, extra), names)))
    results = {n: read(d) for n, d in run_dirs.items()}
    png = os.path.join(ROOT, "bench", "results", "reward_hacking.png")
    prompts = grid(run_dirs, png)
    command = "python bench/reward_hacking.py " + " ".join(sys.argv[1:])
    previous = os.path.join(ROOT, "bench", "results", "reward_hacking.json")
    if args.report_only and os.path.isfile(previous):                  # keep the command that made the runs
        command, extra = (json.load(open(previous))[k] for k in ("command", "train_flags"))
    write_json("reward_hacking", {"command": command, "train_flags": extra, "seed": args.seed, "images": args.images,
                                  "results": results, "grid_prompts": prompts})
    base = results[names[0]]["base"]
    lines = [f"Command: `{command}` (critic-PPO, tiny-dit, seed {args.seed}, {args.images} images per run, "
             f"held-out prompts x {args.eval_seeds} seeds, deterministic sampler)", "",
             "| rewards trained on | held-out strict accuracy | partial credit | mean JPEG size (kB, q95) |",
             "|---|---|---|---|",
             f"| (base model) | {base['heldout_strict']:.3f} | {base['heldout_partial']:.3f} | {base['jpeg_kb']:.2f} |"]
    for n in names:
        f = results[n]["final"]
        lines.append(f"| `{n.split()[0]}`{' ' + ' '.join(n.split()[1:]) if ' ' in n else ''} | {f['heldout_strict']:.3f} | {f['heldout_partial']:.3f} | {f['jpeg_kb']:.2f} |")
    lines += ["", f"![final samples of each run](bench/results/reward_hacking.png)", "",
              "Grid columns, left to right: " + "; ".join(f"\"{p}\"" for p in prompts) + "."]
    write_section("reward-hacking", "## Reward hacking: `jpeg` vs `shapes` vs `shapes,jpeg`\n\n" + "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
