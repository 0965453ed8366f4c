"""Shared by the bench scripts: each owns one section of BENCHMARKS.md (between markers) and
one JSON file under bench/results/, so re-running one script never touches another's figures."""
import json
import os
import platform
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "bench", "results")


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def mean(xs):
    return sum(xs) / len(xs)


def se(xs):
    """The standard error of the mean over seeds; nan for one seed."""
    return (sum((x - mean(xs)) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) ** 0.5 if len(xs) > 1 else float("nan")


def pm(xs):
    """'mean ± s.e.' over seeds; the mean alone for one seed (no standard error)."""
    return f"{mean(xs):.3f} ± {se(xs):.3f}" if len(xs) > 1 else f"{mean(xs):.3f}"


def last_quarter(images, values):
    """The mean of a run's evaluations over its last quarter of images: an end-of-run figure less at the mercy
    of one dip than the last point."""
    return mean([a for n, a in zip(images, values) if n >= 0.75 * images[-1]])


def write_json(name, data):
    """bench/results/NAME.json, or PREFIX.json for a name with a folder in it; written atomically."""
    path = (name if os.path.dirname(name) else os.path.join(RESULTS, name)) + ".json"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def write_section(name, markdown):
    """Replace (or append) the section `name` of BENCHMARKS.md."""
    path = os.path.join(ROOT, "BENCHMARKS.md")
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\nEach section is written by the script it names; figures are measured, never typed in.\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- train.py runs

def resolved_config(argv, world_size=8):
    """train.py's own resolved configuration of `argv` as each of `world_size` torchrun ranks sees it
    (WORLD_SIZE set while it resolves, then restored): the per-rank sizes the benchmarks model."""
    import train
    before = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK")}
    os.environ.update(WORLD_SIZE=str(world_size), RANK="0")          # as torchrun sets them for rank 0
    try:
        return train.configure(train.build_parser().parse_args(argv), argv)[0]
    finally:
        for k, v in before.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def split_train_flags(argv):
    """`script.py [own flags] -- [train.py flags]` -> (own, train.py's)."""
    if "--" not in argv:
        return argv, []
    return argv[:argv.index("--")], argv[argv.index("--") + 1:]


def add_run_args(p, runs, eval_every, jobs):
    """The flags every benchmark made of train.py runs shares."""
    p.add_argument("--model", default="tiny-dit", help="base model (train.py --model)")
    p.add_argument("--images", type=int, default=2560, help="images generated per run")
    p.add_argument("--batch-size", type=int, default=32, help="images per iteration")
    p.add_argument("--eval-every", type=int, default=eval_every, help="held-out evaluation every N iterations")
    p.add_argument("--eval-seeds", type=int, default=8, help="images per held-out prompt in each evaluation")
    p.add_argument("--jobs", type=int, default=jobs, help="runs at once (each on --threads threads)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--runs", default=os.path.join(ROOT, "bench", "runs", runs), help="where the runs go")
    p.add_argument("--report-only", action="store_true", help="only read finished runs")


def launch(flags, threads, log_path, script="train.py"):
    """script (train.py, or eval.py) with these flags, on `threads` torch threads, offline, output to
    log_path: exit code."""
    import subprocess
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        return subprocess.call([sys.executable, os.path.join(ROOT, script), *flags], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT)


def train_run(args, run_dir, flags, label):
    """One benchmark run of args.images images: reused if it finished before, resumed from its
    checkpoint if it was interrupted after one (keeping its own config), else started over.
    flags: train.py's, besides the budget, evaluation and run directory. Returns run_dir."""
    import shutil
    import time
    if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")) and any(
            os.path.isdir(os.path.join(run_dir, d)) for d in ("pipeline", "policy_lora")):
        return run_dir                                  # finished before: reuse
    iters = ["--iters", str(args.images // args.batch_size)]
    if os.path.isdir(os.path.join(run_dir, "checkpoint")):
        cmd = ["--resume", run_dir, *iters]
    else:                                               # interrupted before its first checkpoint: start over
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = ["--model", args.model, *iters, "--batch-size", str(args.batch_size), "--eval-every",
               str(args.eval_every), "--eval-seeds", str(args.eval_seeds), "--sample-every", str(10 ** 6),
               "--save-every", "20", "--run-dir", run_dir, *flags]
    t0 = time.time()
    code = launch(cmd, args.threads, run_dir + ".log")
    print(f"{label}: exit {code} after {time.time() - t0:.0f}s ({run_dir}.log)", flush=True)
    if code:
        raise SystemExit(f"{label} failed; see {run_dir}.log")
    return run_dir


def prompt_accuracy(model, seeds, cache):
    """Strict accuracy of `model`'s (a name, or a pipeline directory such as a run's pipeline/)
    deterministic samples, the held-out evaluation's sampler and seeds, on the world's training
    and held-out prompts: the mean over prompts, over categories (what train.py's
    category-balanced prompt draw weighs) and per category. A gain on the training prompts alone
    is sharpening on what RL saw; on the held-out ones, what generalises. Cached as JSON in `cache`."""
    cached = json.load(open(cache)) if os.path.isfile(cache) else {}
    if cached.get("seeds") == list(seeds):
        return cached
    import toy
    from models import load_backbone
    backbone, out = load_backbone(model), {"seeds": list(seeds)}
    for split in ("train", "heldout"):
        metas = toy.prompts(split)
        strict, _ = toy.judge_samples(backbone, metas, seeds)
        per_prompt = strict.float().mean(0)                                 # (P,) over seeds
        tags = sorted({m["tag"] for m in metas})
        by_tag = {t: per_prompt[[i for i, m in enumerate(metas) if m["tag"] == t]].mean().item() for t in tags}
        out[split] = {"prompt_mean": per_prompt.mean().item(), "category_mean": sum(by_tag.values()) / len(by_tag),
                      "by_category": by_tag}
    write_json(cache.removesuffix(".json"), out)
    return out
