"""The built-in world's gates: the autoencoder's round trip, the supervised gate (how well the
world's tiny DiT learns from correct captions) and the shipped base models' misalignment.

Measured per base model, on held-out prompts (never trained on by RL; seen in pretraining) and on
training prompts, with the deterministic sampler: strict accuracy CFG-free (--cfg 1, what training
and every figure use) and with guidance, by GenEval category; pass@16; and the share of samples that
are well-formed boards (palette colours, shapes on the grid). The gate model's learning curve is read
from the JSON that `pretrain.py --curve` wrote.

Run:  python bench/world.py --gate runs/gate/tiny-dit --gate-curve runs/gate/curve.json
      python bench/world.py --models tiny-unet --reuse   # re-measure one model; the other rows (and the
                                                         # gate's) come from bench/results/world.json
Writes bench/results/world.json and the section "world" of BENCHMARKS.md.
"""
import argparse
import json
import math
import os

import torch

from common import RESULTS, machine, write_json, write_section

ROWS = ("tiny-dit", "tiny-unet", "gate (truthful captions)")   # the table's rows, in order (--reuse keeps them)


def pass_at(n, c, k):
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def measure(backbone, metas, seeds, cfg, num_steps):
    """strict (S, P) bool and well-formed share, deterministic sampler at CFG scale cfg."""
    import rollout
    import toy
    images = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        prompts = [m["prompt"] for m in metas]
        images.append(rollout.sample(backbone, prompts, num_steps, 0.0, cfg, generator=g).images)
    images = torch.cat(images)
    strict = toy.check(images, list(metas) * len(seeds))[0].view(len(seeds), len(metas))
    formed = sum(toy.well_formed(x) for x in images) / len(images)
    return strict, formed


def summary(strict, metas, k):
    import toy
    S = strict.shape[0]
    c = strict.sum(0).tolist()
    out = {"strict": strict.float().mean().item(),
           "strict_se": strict.float().mean(0).std().item() / math.sqrt(len(metas)),
           f"pass@{k}": sum(pass_at(S, ci, k) for ci in c) / len(c)}
    out["by_tag"] = {t: strict[:, [m["tag"] == t for m in metas]].float().mean().item() for t in toy.TAGS}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny-dit", "tiny-unet"], help="shipped base models to measure")
    p.add_argument("--gate", default=None, help="the supervised-gate model (pretrain.py --truthful 1)")
    p.add_argument("--gate-curve", default=None, help="its pretrain.py --curve JSON")
    p.add_argument("--seeds", type=int, default=16, help="samples per prompt")
    p.add_argument("--cfg", type=float, default=3.0, help="the guided row's CFG scale")
    p.add_argument("--num-steps", type=int, default=10, help="deterministic denoising steps (what training and evaluation use)")
    p.add_argument("--gate-steps", type=int, default=40, help="the gate model is also measured with this many steps (the paper evaluates with 40)")
    p.add_argument("--reuse", action="store_true", help="keep the rows of the models not measured now (and the gate's, "
                   "without --gate) from the current bench/results/world.json, with the command that measured them")
    args = p.parse_args()
    old = json.load(open(os.path.join(RESULTS, "world.json"))) if args.reuse else {}
    import models
    import pretrain
    import toy
    from diffusers import AutoencoderKL
    results = {"machine": machine()}
    vae = AutoencoderKL.from_pretrained(os.path.join(models.MODELS["tiny-dit"], "vae")).eval()
    results["vae_round_trip"] = pretrain.vae_round_trip(vae, toy.all_prompts() * 8)
    results["vae_latent_numbers"] = vae.config.latent_channels * (toy.RES // 8) ** 2
    print("vae round trip", results["vae_round_trip"], flush=True)
    rows = [(name, name) for name in args.models] + ([("gate (truthful captions)", args.gate)] if args.gate else [])
    kept = [label for label in ROWS if label in old and label not in dict(rows)]                    # --reuse: measured by old["command"]
    held, train = toy.prompts("heldout"), toy.prompts("train")
    k = min(16, args.seeds)
    settings = {label: [(1.0, args.num_steps), (args.cfg, args.num_steps)] for label, _ in rows}
    if args.gate:
        settings["gate (truthful captions)"] += [(1.0, args.gate_steps), (args.cfg, args.gate_steps)]
    for label, path in rows:
        backbone = models.load_backbone(path)
        r = {}
        for cfg, steps in settings[label]:
            s_held, formed = measure(backbone, held, range(args.seeds), cfg, steps)
            s_train, _ = measure(backbone, train, range(4), cfg, steps)
            r[f"cfg{cfg:g}-steps{steps}"] = {"cfg": cfg, "steps": steps, "heldout": summary(s_held, held, k),
                                             "train": summary(s_train, train, 4), "well_formed": formed}
            print(label, cfg, steps, json.dumps(r[f"cfg{cfg:g}-steps{steps}"]), flush=True)
        results[label] = r
    for label in kept:
        results[label] = old[label]
    if args.gate_curve or "gate_curve" in old:
        results["gate_curve"] = json.load(open(args.gate_curve)) if args.gate_curve else old["gate_curve"]
    command = (f"python bench/world.py --models {' '.join(args.models)} --seeds {args.seeds} --cfg {args.cfg:g} "
               f"--num-steps {args.num_steps} --gate-steps {args.gate_steps}"
               + (f" --gate {args.gate}" if args.gate else "") + (f" --gate-curve {args.gate_curve}" if args.gate_curve else "")
               + (" --reuse" if args.reuse else ""))
    results["command"] = command
    if kept:                                   # where the kept rows came from, kept across later --reuse runs too
        results["kept"] = {label: old.get("kept", {}).get(label) or f"{old['command']} ({old['machine']})" for label in kept}
    write_json("world", results)
    lines = [f"Command: `{command}` ({machine()})."
             + "".join(f" The rows of {label}: `{src}`." for label, src in results.get("kept", {}).items()), "",
             f"Autoencoder: {results['vae_latent_numbers']} latent numbers per 32x32 board; the checker passes "
             f"{results['vae_round_trip']:.4f} of decode(encode(render(prompt))) over every prompt x 8 scenes.", "",
             f"Deterministic sampler; held-out prompts x {args.seeds} seeds (mean ± standard error over prompts), "
             "training prompts x 4 seeds.", "",
             "| model | CFG | steps | held-out strict | pass@" + str(k) + " | train strict | well-formed | "
             + " | ".join(toy.TAGS) + " (held-out) |",
             "|---|---|---|---|---|---|---|" + "---|" * len(toy.TAGS)]
    for label in sorted([label for label, _ in rows] + kept, key=lambda x: ROWS.index(x) if x in ROWS else -1):
        for r in results[label].values():
            h = r["heldout"]
            lines.append(f"| {label} | {r['cfg']:g} | {r['steps']} | {h['strict']:.3f} ± {h['strict_se']:.3f} | "
                         f"{h[f'pass@{k}']:.2f} | {r['train']['strict']:.3f} | {r['well_formed']:.3f} | "
                         + " | ".join(f"{h['by_tag'][t]:.2f}" for t in toy.TAGS) + " |")
    if "gate_curve" in results:
        c = results["gate_curve"]
        lines += ["", f"The gate model's pretraining curve (truthful captions, batch {c['batch']}, lr {c['lr']}, "
                  "held-out strict accuracy of the EMA weights, 4 seeds, CFG 1):", "",
                  "| step | minutes | held-out strict |", "|---|---|---|"]
        lines += [f"| {q['step']} | {q['seconds'] / 60:.1f} | {q['heldout_strict']:.2f} |" for q in c["points"]]
    write_section("world", "## The built-in world: autoencoder, supervised gate, misaligned base models\n\n"
                  + "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
