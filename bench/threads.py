"""How many CPU threads `python train.py` should use on the built-in world: its wall time with 1 and 2
torch threads, alone on the machine and beside one busy single-thread process (another training run,
a test suite, a browser: what a laptop usually has). Torch's OpenMP threads spin-wait for each other
at every small matrix product, so a second process that takes one of their cores stalls them all.

Each configuration runs the real command, `python train.py --threads N --iters I` (the default world,
flags and evaluations), in a fresh run directory, and is timed from start to exit; the busy process is
a single-thread torch loop of small matrix products (what a training run does). Run it on an
otherwise idle machine: the 'alone' rows assume nothing else runs.

Run:  python bench/threads.py                      # 1 and 2 threads, alone and busy, 10 iterations each,
                                                   # then the default (1 thread) at full length, alone and busy
      python bench/threads.py --report-only        # rewrite the section from bench/results/threads.json
Writes bench/results/threads.json and the BENCHMARKS.md section 'threads'.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import RESULTS, ROOT, machine, write_json, write_section

BUSY = ("import torch\ntorch.set_num_threads(1)\nx = torch.randn(128, 128)\n"
        "while True:\n    x = torch.tanh(x @ x) * 0.5\n")


def timed(threads, iters, busy, workdir):
    """Seconds of `python train.py --threads T --iters I` from start to exit (beside a busy process if busy)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}    # --threads decides, not the shell's
    env["HF_HUB_OFFLINE"] = "1"
    hog = subprocess.Popen([sys.executable, "-c", BUSY], env={**env, "OMP_NUM_THREADS": "1"}) if busy else None
    try:
        run_dir = os.path.join(workdir, f"t{threads}-i{iters}-{'busy' if busy else 'alone'}")
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--threads", str(threads), "--iters",
                            str(iters), "--run-dir", run_dir], env=env, cwd=workdir, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    finally:
        if hog:
            hog.kill(), hog.wait()
    if r.returncode:
        raise SystemExit(f"train.py --threads {threads} failed:\n{r.stderr[-2000:]}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--short-iters", type=int, default=10, help="iterations of the 1-vs-2-thread comparison")
    p.add_argument("--full-iters", type=int, default=160, help="iterations of the default run (train.py's --iters)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the section from the JSON")
    args = p.parse_args()
    if args.report_only:
        rows = json.load(open(os.path.join(RESULTS, "threads.json")))["rows"]
        args.short_iters, args.full_iters = min(r["iters"] for r in rows), max(r["iters"] for r in rows)
    else:
        workdir = tempfile.mkdtemp(prefix="threads-")
        rows = []
        for threads in (1, 2):
            for busy in (False, True):
                s = timed(threads, args.short_iters, busy, workdir)
                rows.append({"threads": threads, "iters": args.short_iters, "busy": busy, "seconds": s})
                print(rows[-1], flush=True)
        for busy in (False, True):
            s = timed(1, args.full_iters, busy, workdir)
            rows.append({"threads": 1, "iters": args.full_iters, "busy": busy, "seconds": s})
            print(rows[-1], flush=True)
        shutil.rmtree(workdir, ignore_errors=True)
        write_json("threads", {"rows": rows, "machine": machine(), "cores": os.cpu_count()})
    get = lambda t, i, b: next(r["seconds"] for r in rows if (r["threads"], r["iters"], r["busy"]) == (t, i, b))
    lines = ["| torch threads | iterations | alone | beside one busy single-thread process | ratio |", "|---|---|---|---|---|"]
    for t, i in ((1, args.short_iters), (2, args.short_iters), (1, args.full_iters)):
        lines.append(f"| {t} | {i} | {get(t, i, False):.0f} s | {get(t, i, True):.0f} s | "
                     f"{get(t, i, True) / get(t, i, False):.2f}x |")
    write_section("threads", "\n".join([
        "## Threads: `python train.py` alone and beside a busy process (bench/threads.py)", "",
        f"`python bench/threads.py` on {os.cpu_count()} cores ({machine().split(',')[0]}): the whole command "
        "`python train.py --threads T --iters I` (start-up, the base model's and every held-out evaluation, "
        "export; train.py's defaults otherwise) timed from start to exit; the busy process is a single-thread "
        "torch loop of 128x128 matrix products.", "", *lines, "",
        "train.py's CPU default is 1 thread (`--threads`; OMP_NUM_THREADS, when set, is respected): beside a "
        "busy process it loses nothing, where 2 threads run 3x slower; alone, 2 threads are faster (pass "
        "`--threads 2` on an idle machine)."]))


if __name__ == "__main__":
    main()
