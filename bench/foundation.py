"""The foundation's figures: held-out strict accuracy of the shipped base models, and the time
of one rollout (32 prompts x 10 steps) for each tiny model, against diffusers' own pipeline
call for the same work where one applies (tiny random-weight SD3 / SD1.5 architectures: the
shapes world is pixel-space, which no diffusers pipeline covers).

Run: python bench/foundation.py        (CPU, a few minutes; writes bench/results/foundation.json
                                        and the 'foundation' section of BENCHMARKS.md)
"""
import argparse
import statistics
import sys
import tempfile
import time

import torch

from common import ROOT, machine, write_json, write_section

sys.path.insert(0, f"{ROOT}/tests")
import rollout  # noqa: E402
import toy  # noqa: E402
from models import load_backbone  # noqa: E402
from tiny import make_tiny_sd15, make_tiny_sd3  # noqa: E402


def timed(fn, repeats):
    fn()                                               # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--seeds", type=int, default=4, help="images per held-out prompt for the accuracy")
    args = p.parse_args()
    prompts = [m["prompt"] for m in toy.prompts("train")][:32]
    out = {"machine": machine(), "command": "python bench/foundation.py", "models": {}}

    for name in ("tiny-dit", "tiny-unet"):
        b = load_backbone(name)
        acc, score = toy.evaluate(b, toy.prompts("heldout"), range(args.seeds), num_steps=10)
        noise = rollout.TRAIN_NOISE[b.sampler]
        t_sde = timed(lambda: rollout.sample(b, prompts, 10, noise, generator=torch.Generator().manual_seed(0)), args.repeats)
        t_ode = timed(lambda: rollout.sample(b, prompts, 10, 0.0, generator=torch.Generator().manual_seed(0)), args.repeats)
        out["models"][name] = {"heldout_strict_accuracy": acc, "heldout_partial_credit": score,
                               "heldout_images": len(toy.prompts("heldout")) * args.seeds,
                               "rollout_s_sde": t_sde, "rollout_s_deterministic": t_ode, "pipeline_s": None}
        print(name, out["models"][name])

    with tempfile.TemporaryDirectory() as tmp:
        for name, make in (("sd3.5m-arch (tiny random)", make_tiny_sd3), ("sd1.5-arch (tiny random)", make_tiny_sd15)):
            b = load_backbone(make(f"{tmp}/{name[:5]}", sample_size=16))
            kw = {"max_sequence_length": b.max_sequence_length} if b.sampler == "flow" else {"eta": 0.0}
            t_pipe = timed(lambda: b.pipe(prompts, num_inference_steps=10, guidance_scale=1.0, output_type="pt",
                                          generator=torch.Generator().manual_seed(0), **kw), args.repeats)
            t_ode = timed(lambda: rollout.sample(b, prompts, 10, 0.0, generator=torch.Generator().manual_seed(0)), args.repeats)
            noise = rollout.TRAIN_NOISE[b.sampler]
            t_sde = timed(lambda: rollout.sample(b, prompts, 10, noise, generator=torch.Generator().manual_seed(0)), args.repeats)
            out["models"][name] = {"rollout_s_sde": t_sde, "rollout_s_deterministic": t_ode, "pipeline_s": t_pipe}
            print(name, out["models"][name])
    write_json("foundation", out)

    rows = ["| model | held-out strict accuracy | partial credit | rollout, SDE + log-probs (s) | rollout, deterministic (s) | diffusers pipeline (s) |",
            "|---|---|---|---|---|---|"]
    for name, r in out["models"].items():
        acc = f"{r['heldout_strict_accuracy']:.3f} ({r['heldout_images']} images)" if "heldout_strict_accuracy" in r else "-"
        score = f"{r['heldout_partial_credit']:.3f}" if "heldout_partial_credit" in r else "-"
        pipe = f"{r['pipeline_s']:.2f}" if r["pipeline_s"] else "n/a (pixel space)"
        rows.append(f"| {name} | {acc} | {score} | {r['rollout_s_sde']:.2f} | {r['rollout_s_deterministic']:.2f} | {pipe} |")
    write_section("foundation", f"""## Foundation: base models and rollout cost

Command: `python bench/foundation.py` on {out['machine']}.
Accuracy: all held-out prompts x {args.seeds} seeds, deterministic sampler, 10 steps, judged by `toy.check`.
Timing: one rollout of 32 prompts x 10 steps, CFG off, median of {args.repeats} after a warm-up; the
pipeline column is diffusers' own `pipe(...)` call for the same 32 x 10 deterministic work.

""" + "\n".join(rows))


if __name__ == "__main__":
    main()
