"""Per-image CPU cost of each reward's scorer, with random weights of the real size.

Nothing is downloaded: each model is built from its published architecture (the configs
below) with random weights and handed to the same factory in rewards.py that real weights go
through (its `model=` / `detector=` arguments), so the time covers the real preprocessing and
forward pass; weights do not change the cost. Each reward runs in its own subprocess so the
peak memory recorded is its own.

Run:  HF_HUB_OFFLINE=1 python bench/reward_cost.py [--rewards hps,geneval] [--batch 1] [--threads 1]
Writes bench/results/reward_cost.json (one record per reward; `error` where it could not run).
"""
import argparse
import datetime
import gzip
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import geneval  # noqa: E402
import rewards  # noqa: E402

# Published architectures (config.json of each hub repo), so the random models have the real size.
CLIP_L14 = dict(   # openai/clip-vit-large-patch14: the aesthetic predictor's and GenEval's colour CLIP
    text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14),
    projection_dim=768)
CLIP_H14 = dict(   # yuvalkirstain/PickScore_v1 (a LAION CLIP ViT-H/14)
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="gelu"),
    projection_dim=1024)
OWLV2_BASE = dict(vision_config=dict(image_size=960))   # google/owlv2-base-patch16-ensemble; the rest are defaults


NOTES = ("CPU time per image of one scorer call after one warm-up call, random weights of the real size, "
         "fp32, torch threads as recorded. peak_rss_gib is the subprocess's peak (model + activations). "
         "geneval: OWLv2-B/16 at 960x960 plus CLIP-L/14 colour crops (the `count` top boxes of each coloured "
         "clause); with random weights nearly every patch passes the threshold, so NMS and the verdict see "
         "thousands of boxes that real weights would not produce.")


def clip_tokenizer(pad="<|endoftext|>"):
    """CLIP's full BPE tokenizer (49408 tokens) built from the merges file open_clip ships."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer
    merges = [tuple(m.split()) for m in gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab = {t: i for i, t in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad)


def random_clip(config):
    from transformers import CLIPConfig, CLIPModel
    return CLIPModel(CLIPConfig(**config))


def build(name, batch, side, tmp):
    """(scorer, images, prompts, metadata, parameter count) for reward `name`, random real-size weights."""
    torch.manual_seed(0)
    images = torch.rand(batch, 3, side, side)
    prompts = ["a photo of a red cat sitting on a wooden bench next to a blue car"] * batch
    metadata, modules = None, []
    if name in ("hps", "clip"):
        import open_clip
        model = open_clip.create_model("ViT-H-14")
        modules = [model]
        fn = rewards.build_reward(name, model=model)
    elif name == "pickscore":
        model = random_clip(CLIP_H14)
        modules = [model]
        fn = rewards.build_reward(name, model=model, tokenizer=clip_tokenizer())
    elif name == "aesthetic":
        model = random_clip(CLIP_L14)
        head = torch.nn.Module()
        head.layers = torch.nn.Sequential(*[torch.nn.Linear(i, o) if i else torch.nn.Dropout() for i, o in
                                            [(768, 1024), (0, 0), (1024, 128), (0, 0), (128, 64), (0, 0), (64, 16), (16, 1)]])
        torch.save(head.state_dict(), os.path.join(tmp, "head.pth"))
        modules = [model, head]
        fn = rewards.build_reward(name, path=os.path.join(tmp, "head.pth"), model=model)
    elif name == "geneval":
        from transformers import Owlv2Config, Owlv2ForObjectDetection
        detector = Owlv2ForObjectDetection(Owlv2Config(**OWLV2_BASE))
        clip = random_clip(CLIP_L14)
        modules = [detector, clip]
        fn = rewards.build_reward(name, detector=detector, detector_tokenizer=clip_tokenizer(pad="!"),
                                  clip=clip, clip_tokenizer=clip_tokenizer())
        metadata = geneval.prompts(batch, seed=0, tags=("color_attr",))   # the costliest: two colour crops
        prompts = [m["prompt"] for m in metadata]
    elif name == "shapes":
        import toy
        metadata = toy.prompts("train")[:batch]
        prompts = [m["prompt"] for m in metadata]
        images = torch.rand(batch, 3, toy.RES, toy.RES)
        fn = rewards.build_reward(name)
    else:
        fn = rewards.build_reward(name)
    params = sum(p.numel() for m in modules for p in m.parameters())
    return fn, images, prompts, metadata, params


def measure(name, batch=1, side=512, threads=None):
    """Build, warm up on one image, then time one call on `batch` images."""
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fn, images, prompts, metadata, params = build(name, batch, side, tmp)
        build_s = time.perf_counter() - t0
        fn(images[:1], prompts[:1], metadata[:1] if metadata else None)
        t0 = time.perf_counter()
        scores = fn(images, prompts, metadata)
        call_s = time.perf_counter() - t0
    return {"reward": name, "batch": batch, "image_side": int(images.shape[-1]), "threads": torch.get_num_threads(),
            "per_image_s": round(call_s / batch, 4), "build_s": round(build_s, 2), "params_m": round(params / 1e6, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
            "finite": bool(torch.isfinite(scores).all())}


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next((int(line.split()[1]) / 2 ** 20 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem, 1), "python": platform.python_version(),
            "torch": torch.__version__, "date": datetime.date.today().isoformat()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rewards", default=",".join(rewards.REWARDS))
    parser.add_argument("--batch", type=int, default=1, help="images per timed call")
    parser.add_argument("--side", type=int, default=512, help="image side in pixels (SD1.5's 512; shapes is 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (keep the machine usable)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per reward before it is recorded as too slow")
    parser.add_argument("--one", help=argparse.SUPPRESS)   # the subprocess: measure one reward, print JSON
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "reward_cost.json"))
    parser.add_argument("--report", action="store_true", help="only rewrite the BENCHMARKS.md section from --out")
    args = parser.parse_args()
    if args.report:
        return write_markdown(args.out)
    if args.one:
        print(json.dumps(measure(args.one, args.batch, args.side, args.threads)))
        return
    records = []
    for name in rewards._split(args.rewards):
        cmd = [sys.executable, __file__, "--one", name, "--batch", str(args.batch), "--side", str(args.side),
               "--threads", str(args.threads)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            if out.returncode == 0:
                record = json.loads(out.stdout.strip().splitlines()[-1])
            else:
                record = {"reward": name, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
        except subprocess.TimeoutExpired:
            record = {"reward": name, "error": f"did not finish in {args.timeout}s on this CPU"}
        print(json.dumps(record), flush=True)
        records.append(record)
    if os.path.exists(args.out):   # a run over some rewards updates their records, keeps the others
        with open(args.out) as f:
            done = {r["reward"]: r for r in json.load(f)["results"]}
        records = list({**done, **{r["reward"]: r for r in records}}.values())
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine(), "notes": NOTES, "results": records}, f, indent=1)
    print(f"wrote {args.out}")
    write_markdown(args.out)


def write_markdown(path):
    """Its section of BENCHMARKS.md, from the JSON (`--report` alone rewrites it without measuring)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from common import write_section
    data = json.load(open(path))
    m = data["machine"]
    lines = [f"Command: `HF_HUB_OFFLINE=1 python bench/reward_cost.py` ({m['cpu']}, {m['cores']} cores, torch "
             f"{m['torch']}, {m['date']}). {data['notes']}", "",
             "| reward | seconds per image (CPU) | image side | threads | parameters (M) | build (s) | peak RSS (GiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        if "error" in r:
            lines.append(f"| `{r['reward']}` | {r['error']} | | | | | |")
        else:
            lines.append(f"| `{r['reward']}` | {r['per_image_s']:.3f} | {r['image_side']} | {r['threads']} | "
                         f"{r['params_m']:.1f} | {r['build_s']:.1f} | {r['peak_rss_gib']:.2f} |")
    write_section("reward-cost", "## What each reward costs per image on a CPU (random weights of the real size)\n\n"
                  + "\n".join(lines))


if __name__ == "__main__":
    main()
