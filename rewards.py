"""Rewards: one factory per reward (GenEval-style judging through geneval.py), and the mixer that normalises
several rewards and sums them with weights (arXiv 2605.27736 section 6; METHOD.md section 6).

Every factory returns a batched scorer fn(images, prompts, metadata) -> (B,) float32 on the
CPU, where images are (B, 3, H, W) in [0, 1] at any size. Heavy imports (open_clip,
transformers) and weight loading happen inside the factory, never at import time.

| paper (METHOD.md) | here |
|---|---|
| R_i(decode(x_0), c), one per --rewards name (1, 6) | build_reward(name) -> fn(images, prompts, metadata) -> (B,) |
| normalised by running statistics (6) | RunningNorm.normalise(raw (B, R)) -> (B, R) |
| w_i, the weighted sum (6) | RewardMixer.weights; mixer(images, prompts, metadata)["total"] (B,) |
| strict accuracy (8) | fn.last_strict (B,) bool; mixer(...)["strict"] |
| not the paper's: monitors, scored raw and only logged, where reward hacking shows | RewardMixer.monitor |

References
  1. DDPO (kvablack/ddpo-pytorch, rewards.py): one factory per reward; JPEG (in)compressibility.
  2. HPSv2.1 (xswu/HPSv2), PickScore (yuvalkirstain/PickScore_v1), the LAION aesthetic
     predictor (christophschuhmann/improved-aesthetic-predictor), open_clip's CLIP score.
  3. GenEval (djghosh13/geneval): prompt templates, metadata and verdict rules; Flow-GRPO's
     partial-credit variant of them (arXiv 2505.05470).

Over ~450 lines: seven factories with their loaders, the reward flags whose --reward-path checks
read checkpoint headers without loading a model, the mixer and the scoring CLI are one concept: what
a reward is and how several become one (GenEval's own rules are in geneval.py).

Run:   python rewards.py --rewards hps,jpeg --reward-path hps=HPS_v2.1_compressed.pt \
           --images a.png b.png --prompts "a cat" "a dog"
Test:  HF_HUB_OFFLINE=1 python -m pytest -q tests/test_rewards.py   (tiny random weights, offline)
Cost:  python bench/reward_cost.py   (per-image CPU time of real-size random-weight models)
"""
import argparse
import dataclasses
import io
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

import cli
import geneval
from cli import InputError

GENEVAL_THRESHOLDS = (0.3, 0.9)     # GenEval's evaluator: a box's score to count, and on counting prompts
REWARDS = ("hps", "clip", "pickscore", "aesthetic", "geneval", "jpeg", "jpeg-incompress", "shapes", "toy-clip", "toy-pref")
WORLD_ONLY = ("shapes", "toy-clip", "toy-pref")          # they judge the built-in world's 32 px boards only
NEEDS_METADATA = ("geneval", "shapes")


class RewardError(InputError):
    """Bad reward configuration or input. The CLI prints the one-line message and exits 2."""


# ----------------------------------------------------------------------------- default weights

HPS_REPO, HPS_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"
PICKSCORE, PICKSCORE_PROCESSOR = "yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_L14 = "openai/clip-vit-large-patch14"
CHECKPOINTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")   # the world's shipped models
OWLV2 = "google/owlv2-base-patch16-ensemble"
AESTHETIC_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                 "sac+logos+ava1-l14-linearMSE.pth")
# reward -> weight part ("" = the main one) -> (kind of checkpoint, default weights).
# A local copy replaces a part with --reward-path NAME=PATH or NAME.PART=PATH.
WEIGHTS = {
    "hps": {"": ("open_clip file", f"{HPS_FILE} from the hub repo {HPS_REPO} (open_clip ViT-H-14)")},
    "clip": {"": ("open_clip file", "open_clip's --clip-pretrained tag of --clip-model")},
    "pickscore": {"": ("clip dir", PICKSCORE), "processor": ("tokenizer dir", PICKSCORE_PROCESSOR)},
    "aesthetic": {"": ("aesthetic head", AESTHETIC_URL), "clip": ("clip dir", CLIP_L14)},
    "geneval": {"": ("owlv2 dir", OWLV2), "clip": ("clip+tokenizer dir", CLIP_L14)},
    "toy-clip": {"": ("toy-clip dir", os.path.join(CHECKPOINTS, "toy-clip"))},
    "toy-pref": {"": ("toy-clip dir", os.path.join(CHECKPOINTS, "toy-pref"))},
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)   # every CLIP used here was trained with these
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- flags

def add_reward_args(parser):
    g = parser.add_argument_group("rewards")
    paths = "; ".join(f"{name}{'.' + part if part else ''}: {default}"
                      for name, parts in WEIGHTS.items() for part, (_, default) in parts.items())
    g.add_argument("--rewards", default=None, help=f"comma list to train on, from: {', '.join(REWARDS)} (default: "
                   "shapes, the checker, on the built-in world; hps,clip, the design card's, on real models)")
    g.add_argument("--reward-weights", default=None,
                   help="comma list, one weight per --rewards entry, applied to the normalised rewards (default all 1)")
    g.add_argument("--reward-path", action="append", default=[], metavar="NAME[.PART]=PATH",
                   help=f"local weights instead of the defaults (repeatable). Defaults: {paths}. "
                        "hps/clip take an open_clip state_dict file; the others a save_pretrained folder "
                        "(aesthetic: the MLP head .pth)")
    g.add_argument("--monitor-rewards", default="", help="comma list scored for logging only (to watch for reward hacking)")
    add_geneval_args(g)
    g.add_argument("--clip-model", default="ViT-H-14", help="open_clip architecture of the clip reward (default %(default)s)")
    g.add_argument("--clip-pretrained", default="laion2b_s32b_b79k",
                   help="open_clip pretrained tag of the clip reward, fetched from the hub (default %(default)s; "
                        "or --reward-path clip=FILE)")
    return g


def add_geneval_args(g):
    """The geneval reward's thresholds (train.py and eval.py): GenEval's own values by default."""
    g.add_argument("--geneval-threshold", type=cli.finite_float(min=0, max=1), default=GENEVAL_THRESHOLDS[0],
                   help="geneval reward (an in-process proxy, not the benchmark): detector score a box needs to "
                        "count (default GenEval's 0.3; its evaluator uses Mask2Former, this reward OWLv2, whose "
                        "sigmoid scores are calibrated differently, and colours from the box crop, not the mask)")
    g.add_argument("--geneval-counting-threshold", type=cli.finite_float(min=0, max=1), default=GENEVAL_THRESHOLDS[1],
                   help="geneval reward: the score a box needs on counting prompts (default GenEval's 0.9)")


@dataclasses.dataclass
class RewardSpec:
    names: list          # trained on, in order: column i of raw / normalised, critic head i
    weights: list
    monitor: list        # scored for logging only
    paths: dict          # name -> {part: path}
    opts: dict           # name -> extra factory arguments from flags

    def build_kwargs(self, name):
        parts = self.paths.get(name, {})
        return {**self.opts.get(name, {}), **{(f"{p}_path" if p else "path"): v for p, v in parts.items()}}

    def mixer(self, device="cpu", dtype=torch.float32):
        return RewardMixer(self.names, self.weights, self.monitor, device=device, dtype=dtype,
                           build_kwargs={n: self.build_kwargs(n) for n in self.names + self.monitor})


def _split(text):
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def parse_reward_args(args):
    """Validate the reward flags (names, weights, local paths) without loading any model."""
    names, monitor = _split(args.rewards), _split(getattr(args, "monitor_rewards", ""))
    if not names:
        raise RewardError(f"--rewards is empty; choose from {', '.join(REWARDS)}")
    for n in names + monitor:
        if n not in REWARDS:
            raise RewardError(f"unknown reward {n!r}; choose from {', '.join(REWARDS)}")
    for n in set(names + monitor):
        if (names + monitor).count(n) > 1:
            raise RewardError(f"reward {n!r} is named twice in --rewards/--monitor-rewards")
    if getattr(args, "reward_weights", None) is None:
        weights = [1.0] * len(names)
    else:
        try:
            weights = [float(w) for w in _split(args.reward_weights)]
        except ValueError:
            raise RewardError(f"--reward-weights {args.reward_weights!r}: not a comma list of numbers") from None
        if len(weights) != len(names):
            raise RewardError(f"--reward-weights has {len(weights)} values for {len(names)} rewards ({','.join(names)})")
        if not all(math.isfinite(w) for w in weights):
            raise RewardError(f"--reward-weights {args.reward_weights!r}: weights must be finite")
        if not any(weights):
            raise RewardError(f"--reward-weights {args.reward_weights!r}: every weight is 0, so the total reward is "
                              "0 whatever the images")
    paths = {}
    for item in getattr(args, "reward_path", None) or []:
        key, sep, path = item.partition("=")
        name, _, part = key.partition(".")
        if not sep or not path:
            raise RewardError(f"--reward-path {item!r}: expected NAME=PATH")
        if name not in WEIGHTS:
            raise RewardError(f"--reward-path {key}: {name!r} loads no weights (those that do: {', '.join(WEIGHTS)})")
        if part not in WEIGHTS[name]:
            raise RewardError(f"--reward-path {key}: {name} has no part {part!r} "
                              f"(parts: {', '.join(p or '(main)' for p in WEIGHTS[name])})")
        if name not in names + monitor:
            raise RewardError(f"--reward-path {key}: {name!r} is not in --rewards or --monitor-rewards")
        _check_path(key, WEIGHTS[name][part][0], os.path.expanduser(path))
        paths.setdefault(name, {})[part] = os.path.expanduser(path)
    opts = {"clip": {"arch": getattr(args, "clip_model", "ViT-H-14"),
                     "pretrained": getattr(args, "clip_pretrained", "laion2b_s32b_b79k")},
            "geneval": {"threshold": getattr(args, "geneval_threshold", GENEVAL_THRESHOLDS[0]),
                        "counting_threshold": getattr(args, "geneval_counting_threshold", GENEVAL_THRESHOLDS[1])}}
    return RewardSpec(names, weights, monitor, paths, opts)


def _tensor_shapes(path):
    """Names and shapes of the tensors in a checkpoint, without reading the tensors themselves
    (the safetensors header, or torch.load with mmap): validation must not load a model."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # files in torch's legacy (non-zip) format cannot be mmapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        return {}
    return {k.removeprefix("module."): tuple(v.shape) for k, v in obj.items() if torch.is_tensor(v)}


def _check_path(key, kind, path):
    where = f"--reward-path {key}={path}"
    if not os.path.exists(path):
        raise RewardError(f"{where}: no such file or directory")
    if kind in ("open_clip file", "aesthetic head"):
        if not os.path.isfile(path):
            raise RewardError(f"{where}: expected a checkpoint file, got a directory")
        try:
            shapes = _tensor_shapes(path)
        except Exception as e:
            raise RewardError(f"{where}: not a torch or safetensors checkpoint ({type(e).__name__})") from None
        if kind == "open_clip file":
            ok = any(k.startswith("visual.") for k in shapes) and any(
                k.startswith(("token_embedding.", "text.")) for k in shapes)
            want = "an open_clip CLIP state_dict (keys visual.*, token_embedding.*)"
        else:
            ok = shapes.get("layers.0.weight") == (1024, 768) and shapes.get("layers.7.weight") == (1, 16)
            want = "the LAION aesthetic MLP state_dict (layers.0 ... layers.7, 768 inputs)"
        if not ok:
            raise RewardError(f"{where}: does not look like {want}")
        return
    if kind == "toy-clip dir":
        if not all(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "model.safetensors")):
            raise RewardError(f"{where}: not a pretrain.py --model toy-clip / toy-pref output (config.json, "
                              "model.safetensors)")
        return
    model_type, needs_tokenizer = {"clip dir": ("clip", False), "clip+tokenizer dir": ("clip", True),
                                   "owlv2 dir": ("owlv2", True), "tokenizer dir": (None, True)}[kind]
    if not os.path.isdir(path):
        raise RewardError(f"{where}: expected a save_pretrained folder, got a file")
    if model_type:
        try:
            with open(os.path.join(path, "config.json")) as f:
                found = json.load(f).get("model_type")
        except (OSError, ValueError):
            raise RewardError(f"{where}: no readable config.json (expected a {model_type} save_pretrained folder)") from None
        if found != model_type:
            raise RewardError(f"{where}: config.json has model_type {found!r}, expected {model_type!r}")
        weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
        if not any(os.path.isfile(os.path.join(path, w)) for w in weights):
            raise RewardError(f"{where}: no weights file ({', '.join(weights)})")
    if needs_tokenizer and not _has_tokenizer(path):
        raise RewardError(f"{where}: no tokenizer (tokenizer.json or vocab.json)")


def _has_tokenizer(path):
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json"))


# ----------------------------------------------------------------------------- shared pieces

def _first_line(e):
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _hf_model(cls, src, key, device, dtype):
    """from_pretrained of a hub name or a local folder; a failure (e.g. offline) becomes one line."""
    try:
        return cls.from_pretrained(src).to(device=device, dtype=dtype).eval()
    except Exception as e:
        raise RewardError(f"could not load {src} ({_first_line(e)}); "
                          f"without hub access pass --reward-path {key}=PATH") from e


def _hf_tokenizer(src, key):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(src)
    except Exception as e:
        raise RewardError(f"could not load the tokenizer of {src} ({_first_line(e)}); "
                          f"without hub access pass --reward-path {key}=PATH") from e


def _pooled(out):
    # transformers 5 returns a model output whose pooler_output is the projected embedding
    return out if torch.is_tensor(out) else out.pooler_output


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _to_pixels(images, size, mean, std, device, dtype, mode="bicubic"):
    """CLIP's eval preprocessing on a tensor batch: short side to `size`, centre crop, normalise.
    The same steps as open_clip's and CLIPImageProcessor's PIL transforms, but batched, on the
    model's device. Returns (B, 3, size, size)."""
    x = images.to(device=device, dtype=torch.float32)
    H, W = x.shape[-2:]
    if min(H, W) != size:
        long = int(size * max(H, W) / min(H, W))   # torchvision's Resize(int) rounding
        x = F.interpolate(x, size=(size, long) if H <= W else (long, size), mode=mode,
                          antialias=True, align_corners=False).clamp(0, 1)  # bicubic overshoots
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


def _open_clip_scorer(model, tokenizer, device, dtype):
    """Cosine similarity of each image with its own prompt, open_clip features."""
    cfg = model.visual.preprocess_cfg
    size = cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"]

    @torch.no_grad()
    def fn(images, prompts, metadata=None):
        x = _to_pixels(images, size, cfg["mean"], cfg["std"], device, dtype, cfg.get("interpolation", "bicubic"))
        # fp32 from the embeddings on: in bf16 the cosine itself would be rounded to steps of ~0.002, a
        # visible share of a prompt's spread of scores (the peers' advantages are differences of them)
        image_features = _unit(model.encode_image(x).float())                                  # (B, D)
        text_features = _unit(model.encode_text(tokenizer(list(prompts)).to(device)).float())  # (B, D)
        return (image_features * text_features).sum(-1).cpu()
    return fn


def _open_clip_model(arch, pretrained, key):
    import open_clip
    try:   # a file path is loaded strictly with torch.load(weights_only=True); a tag is downloaded
        return open_clip.create_model(arch, pretrained=pretrained, weights_only=True)
    except Exception as e:
        raise RewardError(f"could not load open_clip {arch} weights {pretrained!r} ({_first_line(e)}); "
                          f"without hub access pass --reward-path {key}=PATH") from e


# ----------------------------------------------------------------------------- the rewards

def hps_score(device, dtype, path=None, arch="ViT-H-14", model=None):
    """HPSv2.1: cosine of open_clip ViT-H-14 image and prompt features with the HPS weights.
    HPS's {'state_dict': ...} loads directly into open_clip, so the hpsv2 package is not needed."""
    import open_clip
    if model is None:
        if path is None:
            from huggingface_hub import hf_hub_download
            try:
                path = hf_hub_download(HPS_REPO, HPS_FILE)
            except Exception as e:
                raise RewardError(f"could not fetch {HPS_FILE} from {HPS_REPO} ({_first_line(e)}); "
                                  "without hub access pass --reward-path hps=PATH") from e
        model = _open_clip_model(arch, path, "hps")
    return _open_clip_scorer(model.to(device, dtype).eval(), open_clip.get_tokenizer(arch), device, dtype)


def clip_score(device, dtype, path=None, arch="ViT-H-14", pretrained="laion2b_s32b_b79k", model=None):
    """CLIP score: cosine of image and prompt features (not x100: the mixer normalises anyway)."""
    import open_clip
    if model is None:
        model = _open_clip_model(arch, path or pretrained, "clip")
    return _open_clip_scorer(model.to(device, dtype).eval(), open_clip.get_tokenizer(arch), device, dtype)


def pickscore(device, dtype, path=None, processor_path=None, model=None, tokenizer=None):
    """PickScore v1: logit_scale * cosine of CLIP-H image and prompt features. The tokenizer
    comes from processor_path, else from `path` if it holds one, else the LAION CLIP-H repo."""
    from transformers import CLIPModel
    if model is None:
        model = _hf_model(CLIPModel, path or PICKSCORE, "pickscore", device, dtype)
    if tokenizer is None:
        src = processor_path or (path if path and _has_tokenizer(path) else PICKSCORE_PROCESSOR)
        tokenizer = _hf_tokenizer(src, "pickscore.processor")
    size = model.config.vision_config.image_size

    @torch.no_grad()
    def fn(images, prompts, metadata=None):
        x = _to_pixels(images, size, OPENAI_MEAN, OPENAI_STD, device, dtype)
        text = tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
        image_embeds = _unit(_pooled(model.get_image_features(pixel_values=x)).float())   # (B, D), fp32 from here:
        text_embeds = _unit(_pooled(model.get_text_features(**text)).float())            # bf16 steps near 22: 0.125
        return (model.logit_scale.float().exp() * (image_embeds * text_embeds).sum(-1)).cpu()
    return fn


def aesthetic_score(device, dtype, path=None, clip_path=None, model=None):
    """LAION aesthetic predictor v2: an MLP on the unit-norm CLIP ViT-L/14 image embedding."""
    from transformers import CLIPModel
    if model is None:   # the whole CLIP, as DDPO loads it; only its image tower is used
        model = _hf_model(CLIPModel, clip_path or CLIP_L14, "aesthetic.clip", device, dtype)
    head = torch.nn.Module()
    # No nonlinearity between the layers: that is the released predictor ("linearMSE");
    # the dropouts only keep the state_dict keys (layers.0, .2, .4, .6, .7) as released.
    head.layers = torch.nn.Sequential(
        torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    try:
        state = (torch.load(path, map_location="cpu", weights_only=True) if path else
                 torch.hub.load_state_dict_from_url(AESTHETIC_URL, map_location="cpu", weights_only=True))
        head.load_state_dict(state)
    except Exception as e:
        raise RewardError(f"could not load the aesthetic head {path or AESTHETIC_URL} ({_first_line(e)}); "
                          "without network access pass --reward-path aesthetic=PATH") from e
    head = head.to(device, torch.float32).eval()      # fp32 (0.6 M parameters): in bf16 its score has steps of 0.03
    size = model.config.vision_config.image_size

    @torch.no_grad()
    def fn(images, prompts=None, metadata=None):
        x = _to_pixels(images, size, OPENAI_MEAN, OPENAI_STD, device, dtype)
        embed = _unit(_pooled(model.get_image_features(pixel_values=x)).float())     # (B, 768)
        return head.layers(embed).squeeze(-1).cpu()
    return fn


def load_toy_clip(path):
    """A toy-clip / toy-pref model (pretrain.py writes them: config.json, model.safetensors), in eval mode."""
    import toy
    from safetensors.torch import load_file
    try:
        config = json.load(open(os.path.join(path, "config.json")))
        model = toy.build_clip(config["config"])
        model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    except Exception as e:
        raise RewardError(f"could not load the built-in world's reward model {path} ({_first_line(e)}); "
                          "make it with `python pretrain.py --model toy-clip` (and toy-pref)") from None
    return model.eval().requires_grad_(False)


def toy_clip_score(device, dtype, path=None, default="toy-clip"):
    """The built-in world's learned rewards, as the clip and hps rewards are: the cosine of a board's and its
    prompt's features. toy-clip: a CLIP of the world trained on noisy captions (good at objects and colours,
    weak at counts and places, like CLIP); toy-pref: toy-clip fine-tuned on a simulated rater's preferences,
    taste included (pretrain.py). Boards only: 32 px images."""
    import toy
    model = load_toy_clip(path or os.path.join(CHECKPOINTS, default)).to(device)
    tokenizer = toy.build_tokenizer()

    @torch.no_grad()
    def fn(images, prompts, metadata=None):
        if tuple(images.shape[-2:]) != (toy.RES, toy.RES):
            raise RewardError(f"reward '{default}' judges the built-in world's {toy.RES} px boards, got images of "
                              f"{tuple(images.shape[-2:])}")
        x = (images.to(device, torch.float32) - 0.5) / 0.5
        image = model.encode_image(x, normalize=True)
        text = model.encode_text(toy.clip_tokens(prompts, tokenizer).to(device), normalize=True)
        return (image * text).sum(-1).float().cpu()
    return fn


def toy_pref_score(device, dtype, path=None):
    return toy_clip_score(device, dtype, path, default="toy-pref")


def jpeg_incompressibility(device=None, dtype=None):
    """DDPO's incompressibility: JPEG size in kB (quality 95) of each image."""
    from PIL import Image

    def fn(images, prompts=None, metadata=None):
        arrays = (images.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8)
        sizes = []
        for array in arrays.permute(0, 2, 3, 1).numpy():     # (H, W, 3) uint8
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG", quality=95)
            sizes.append(buffer.tell() / 1000)
        return torch.tensor(sizes, dtype=torch.float32)
    return fn


def jpeg_compressibility(device=None, dtype=None):
    """DDPO's compressibility: minus the JPEG size in kB."""
    size_kb = jpeg_incompressibility()
    return lambda images, prompts=None, metadata=None: -size_kb(images, prompts, metadata)


def shapes_score(device=None, dtype=None):
    """The built-in world's checker (toy.check): dense partial credit in [0, 1]; GenEval-style
    pass/fail of the last batch in fn.last_strict (B,) bool."""
    import toy

    def fn(images, prompts, metadata):
        strict, score = toy.check(images.detach().float().cpu(), metadata)
        fn.last_strict = strict
        return score.float()
    fn.last_strict = None
    return fn


# ----------------------------------------------------------------------------- GenEval

def check_metadata(names, metadata_list, prompts=None):
    """RewardError naming the prompt if a reward in `names` that needs metadata lacks it."""
    for name in names:
        if name not in NEEDS_METADATA:
            continue
        mds = metadata_list if metadata_list is not None else [None] * max(1, len(prompts or []))
        for i, md in enumerate(mds):
            problem = geneval.metadata_problem(md, coco=name == "geneval")
            if not problem and name == "shapes":       # the checker sees only its own world's shapes and colours
                import toy
                asked = [c for c in (md or {}).get("include", []) + (md or {}).get("exclude", [])]
                alien = [c["class"] for c in asked if c["class"] not in toy.SHAPES]
                alien += [c["color"] for c in asked if c.get("color") and c["color"] not in toy.COLORS]
                if alien:
                    problem = (f"the built-in world's checker knows {', '.join(toy.SHAPES)} in "
                               f"{', '.join(toy.COLORS)}, not {alien[0]!r} (use the geneval reward on real models)")
            if problem:
                prompt = prompts[i] if prompts and i < len(prompts) else (md or {}).get("prompt", f"#{i}")
                raise RewardError(f"reward '{name}' needs prompt metadata; prompt {prompt!r}: {problem}")


def geneval_score(device, dtype, path=None, clip_path=None, threshold=GENEVAL_THRESHOLDS[0],
                  counting_threshold=GENEVAL_THRESHOLDS[1], nms_iou=0.5, max_objects=16,
                  position_threshold=geneval.POSITION_THRESHOLD, classes=geneval.COCO_CLASSES,
                  detector=None, detector_tokenizer=None, clip=None, clip_tokenizer=None):
    """GenEval in-process, a PROXY of it for training (not the benchmark's score): OWLv2 boxes, CLIP
    zero-shot colour of each box crop, GenEval's rules. Returns the partial credit; fn.last_strict holds
    GenEval's strict pass/fail. How it differs from GenEval's official evaluator: an open-vocabulary
    detector (OWLv2) instead of Mask2Former, so colours are read from the raw box crop, where GenEval's
    colour classifier sees the object's mask on grey, and per-class NMS (OWLv2 predicts one box per
    patch); the thresholds default to GenEval's (--geneval-threshold 0.3, --geneval-counting-threshold
    0.9), but OWLv2's sigmoid scores are calibrated differently from Mask2Former's. A GenEval figure
    to put beside published ones comes from the official evaluator on eval.py's OUT/geneval."""
    from torchvision.ops import batched_nms
    from transformers import CLIPModel, Owlv2ForObjectDetection
    if detector is None:
        detector = _hf_model(Owlv2ForObjectDetection, path or OWLV2, "geneval", device, dtype)
    if detector_tokenizer is None:
        detector_tokenizer = _hf_tokenizer(path or OWLV2, "geneval")
    if clip is None:
        clip = _hf_model(CLIPModel, clip_path or CLIP_L14, "geneval.clip", device, dtype)
    if clip_tokenizer is None:
        clip_tokenizer = _hf_tokenizer(clip_path or CLIP_L14, "geneval.clip")
    classes = list(classes)
    # All classes are asked at once and each box keeps its best class, as a closed-set detector
    # would, so a cat is not also counted as a dog. The queries are encoded once, here.
    with torch.no_grad():
        queries = detector_tokenizer([f"a photo of {geneval.article(c)}" for c in classes], padding="max_length",
                                     max_length=detector.config.text_config.max_position_embeddings,
                                     truncation=True, return_tensors="pt").to(device)
        query_embeds = _pooled(detector.owlv2.get_text_features(**queries))      # (Q, D)
    det_size, clip_size = detector.config.vision_config.image_size, clip.config.vision_config.image_size
    mean = torch.tensor(OPENAI_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=device).view(1, 3, 1, 1)
    colour_classifiers = {}

    def colour_classifier(name):   # GenEval's zero-shot classifier: templates averaged per colour
        if name not in colour_classifiers:
            texts = [t.format(c=c, cls=name) for c in geneval.COLORS for t in geneval.COLOR_TEMPLATES]
            tokens = clip_tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
            embeds = _unit(_pooled(clip.get_text_features(**tokens))).view(len(geneval.COLORS), len(geneval.COLOR_TEMPLATES), -1)
            colour_classifiers[name] = _unit(embeds.mean(1))                   # (10, D)
        return colour_classifiers[name]

    @torch.no_grad()
    def fn(images, prompts, metadata):
        B, _, H, W = images.shape
        side = max(H, W)
        x = F.pad(images.to(device, torch.float32), (0, side - W, 0, side - H))  # OWLv2 pads to a square
        x = F.interpolate(x, size=(det_size, det_size), mode="bilinear", antialias=True, align_corners=False)
        feature_map, _ = detector.image_embedder(pixel_values=((x - mean) / std).to(dtype))  # (B, h, w, D)
        image_feats = feature_map.flatten(1, 2)                                               # (B, P, D)
        logits, _ = detector.class_predictor(image_feats, query_embeds.expand(B, -1, -1))    # (B, P, Q)
        boxes = detector.box_predictor(image_feats, feature_map).float()                      # (B, P, 4) cxcywh
        boxes = torch.cat([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], -1) * side
        boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([W, H, W, H], device=boxes.device))
        scores, labels = logits.float().sigmoid().max(-1)                                     # (B, P)
        strict, partial = [], []
        for b, md in enumerate(metadata):
            cut = counting_threshold if md.get("tag") == "counting" else threshold
            keep = (scores[b] > cut).nonzero().squeeze(1)
            keep = keep[batched_nms(boxes[b, keep], scores[b, keep], labels[b, keep], nms_iou)]
            detections = [{"class": classes[labels[b, i].item()], "box": boxes[b, i].tolist(), "score": scores[b, i].item()}
                          for i in keep.tolist()]
            # as GenEval: only the `count` most confident boxes of a coloured clause's class are
            # judged, so only those are cropped (detections are sorted by score, NMS keeps the order)
            coloured = {}
            for r in md["include"]:
                if "color" in r:
                    coloured[r["class"]] = max(coloured.get(r["class"], 0), r["count"])
            to_colour = [d for c, n in coloured.items() for d in [d for d in detections if d["class"] == c][:n]]
            if to_colour:
                crops = []
                for d in to_colour:
                    x0, y0 = min(int(d["box"][0]), W - 1), min(int(d["box"][1]), H - 1)
                    x1, y1 = max(math.ceil(d["box"][2]), x0 + 1), max(math.ceil(d["box"][3]), y0 + 1)
                    crops.append(_to_pixels(images[b:b + 1, :, y0:y1, x0:x1], clip_size, OPENAI_MEAN,
                                            OPENAI_STD, device, dtype))
                crop_embeds = _unit(_pooled(clip.get_image_features(pixel_values=torch.cat(crops))))  # (N, D)
                for d, e in zip(to_colour, crop_embeds):
                    d["color"] = geneval.COLORS[(colour_classifier(d["class"]) @ e).argmax().item()]
            s, p = geneval.verdict(detections, md, threshold, counting_threshold, max_objects, position_threshold)
            strict.append(s)
            partial.append(p)
        fn.last_strict = torch.tensor(strict, dtype=torch.bool)
        return torch.tensor(partial, dtype=torch.float32)
    fn.last_strict = None
    return fn


# ----------------------------------------------------------------------------- building and mixing

_FACTORIES = {"hps": hps_score, "clip": clip_score, "pickscore": pickscore, "aesthetic": aesthetic_score,
              "geneval": geneval_score, "jpeg": jpeg_compressibility, "jpeg-incompress": jpeg_incompressibility,
              "shapes": shapes_score, "toy-clip": toy_clip_score, "toy-pref": toy_pref_score}


def build_reward(name, device="cpu", dtype=torch.float32, path=None, **opts):
    """The scorer fn(images, prompts, metadata) -> (B,) float32 on the CPU for reward `name`."""
    if name not in _FACTORIES:
        raise RewardError(f"unknown reward {name!r}; choose from {', '.join(REWARDS)}")
    if path is not None and name not in WEIGHTS:
        raise RewardError(f"reward {name!r} loads no weights; --reward-path does not apply")
    if path is not None:
        opts["path"] = path
    return _FACTORIES[name](device=torch.device(device), dtype=dtype, **opts)


class RunningNorm:
    """Running mean and variance of R columns (Welford's, merged a batch at a time, Chan et al.):
    the one scaling of every regression target, the mixer's rewards and critic.fit's returns alike.

        normalised = (r - mean) / max(std, eps)      (population std over every value so far)

    Not an EMA: the statistics converge, so the critic's targets settle in scale."""

    def __init__(self, R, eps=1e-4):
        self.eps = eps   # floor on std: a reward that has been constant so far must not blow up
        self.count, self.mean, self.m2 = (torch.zeros(R, dtype=torch.float64) for _ in range(3))

    def std(self):
        var = torch.where(self.count > 0, self.m2 / self.count.clamp(min=1), torch.ones_like(self.m2))
        return var.sqrt().clamp(min=self.eps)

    def normalise(self, raw, update_stats=True):
        """(B, R) raw -> (B, R) normalised, first merging the batch into the statistics (Chan et al.)."""
        raw64 = raw.double()
        if update_stats:
            n_b = raw64.shape[0]
            mean_b = raw64.mean(0)
            m2_b = ((raw64 - mean_b) ** 2).sum(0)
            n = self.count + n_b
            delta = mean_b - self.mean
            self.mean = self.mean + delta * n_b / n
            self.m2 = self.m2 + m2_b + delta ** 2 * self.count * n_b / n
            self.count = n
        return ((raw64 - self.mean) / self.std()).float()


class RewardMixer(RunningNorm):
    """Scores a batch with every reward, normalises each by running statistics, and mixes:

        normalised_i = (r_i - mean_i) / std_i,    total = sum_i w_i * normalised_i

    so that the weights mean what they say whatever each reward's scale (section 6).
    The statistics are Welford's running mean and variance over every training image so far
    (not an EMA): they converge, so the critic's per-reward heads regress onto targets whose
    scale settles, and they resume exactly (state_dict holds count, mean, M2 in float64).
    The batch is added before it is normalised, so the first batch is normalised by itself.
    Held-out scoring passes update_stats=False (before any update, mean 0 and std 1: raw scores
    pass through). With several processes, gather the raw scores
    (mixer.score) of all ranks and normalise the gathered batch on every rank (mixer.normalise),
    so the statistics stay identical across ranks, as DDPO gathers before normalising.
    Monitor rewards are scored raw, for logging only.
    """

    def __init__(self, names, weights=None, monitor=(), scorers=None, device="cpu", dtype=torch.float32,
                 build_kwargs=None, eps=1e-4):
        self.names, self.monitor = list(names), list(monitor)
        self.weights = torch.tensor(weights if weights is not None else [1.0] * len(self.names), dtype=torch.float32)
        assert len(self.weights) == len(self.names), "one weight per reward"
        self.scorers = dict(scorers or {})
        for n in self.names + self.monitor:
            if n not in self.scorers:
                self.scorers[n] = build_reward(n, device, dtype, **(build_kwargs or {}).get(n, {}))
        super().__init__(len(self.names), eps)

    def score(self, images, prompts, metadata=None, names=None):
        """Raw scores (B, len(names)) and {name: strict (B,) bool} for the rewards that report one."""
        names = self.names if names is None else names
        check_metadata(names, metadata, prompts)
        columns, strict = [], {}
        for n in names:
            r = torch.as_tensor(self.scorers[n](images, prompts, metadata)).float().cpu()
            if r.shape != (len(images),):
                raise RewardError(f"reward '{n}' returned shape {tuple(r.shape)} for {len(images)} images")
            bad = (~torch.isfinite(r)).nonzero()
            if len(bad):
                i = bad[0].item()
                raise RewardError(f"reward '{n}' returned {r[i].item()} for image {i} (prompt {prompts[i]!r})")
            columns.append(r)
            if getattr(self.scorers[n], "last_strict", None) is not None:
                strict[n] = self.scorers[n].last_strict
        return torch.stack(columns, 1) if columns else torch.zeros(len(images), 0), strict

    def __call__(self, images, prompts, metadata=None, update_stats=True):
        raw, strict = self.score(images, prompts, metadata)                               # (B, R)
        normalised = self.normalise(raw, update_stats)                                   # (B, R)
        monitor, monitor_strict = self.score(images, prompts, metadata, self.monitor)    # (B, M)
        return {"raw": raw, "normalised": normalised, "total": normalised @ self.weights,  # total: (B,)
                "monitor": monitor, "strict": {**strict, **monitor_strict}}

    def log_dict(self, out, split="train"):
        """Scalars to log: every reward raw and normalised, monitors raw, strict pass rates."""
        logs = {f"reward/{split}/total": out["total"].mean().item()}
        for i, n in enumerate(self.names):
            logs[f"reward/{split}/{n}/raw"] = out["raw"][:, i].mean().item()
            logs[f"reward/{split}/{n}/normalised"] = out["normalised"][:, i].mean().item()
        for i, n in enumerate(self.monitor):
            logs[f"reward/{split}/monitor/{n}/raw"] = out["monitor"][:, i].mean().item()
        for n, s in out["strict"].items():
            logs[f"reward/{split}/{n}/strict"] = s.float().mean().item()
        return logs

    def state_dict(self):
        """Plain float64 tensors keyed name/count, name/mean, name/m2 (safetensors-friendly)."""
        out = {}
        for i, n in enumerate(self.names):
            out.update({f"{n}/count": self.count[i].clone(), f"{n}/mean": self.mean[i].clone(),
                        f"{n}/m2": self.m2[i].clone()})
        return out

    def load_state_dict(self, state):
        for i, n in enumerate(self.names):
            if f"{n}/count" not in state:
                raise RewardError(f"the checkpoint has no running statistics for reward '{n}'")
            for attr in ("count", "mean", "m2"):
                getattr(self, attr)[i] = torch.as_tensor(state[f"{n}/{attr}"], dtype=torch.float64)


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    """Score image files with the chosen rewards (a quick check that weights load and run)."""
    parser = argparse.ArgumentParser(description="Score images with the rewards of rewards.py.")
    add_reward_args(parser)
    parser.add_argument("--images", nargs="*", default=[], help="image files (same size)")
    parser.add_argument("--prompts", nargs="*", default=[], help="one prompt per image")
    parser.add_argument("--metadata", help="GenEval-style jsonl, one line per image (for geneval/shapes)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        spec = parse_reward_args(args)
        reader = next((n for n in spec.names + spec.monitor if n in NEEDS_METADATA), "geneval")
        metadata = geneval.read_metadata(args.metadata, coco=reader == "geneval") if args.metadata else None
        prompts = args.prompts or [m["prompt"] for m in metadata or []]
        if len(prompts) != len(args.images):
            raise RewardError(f"{len(args.images)} images but {len(prompts)} prompts")
        if not args.images:
            print(f"ok: {spec}")
            return
        check_metadata(spec.names + spec.monitor, metadata, prompts)
        import numpy as np
        from PIL import Image
        arrays = [np.asarray(Image.open(p).convert("RGB")) for p in args.images]
        if len({a.shape for a in arrays}) > 1:
            raise RewardError("images differ in size; give images of one size")
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255   # (B, 3, H, W)
        mixer = spec.mixer(args.device)
        out = mixer(images, prompts, metadata, update_stats=False)
    except InputError as e:                      # RewardError, geneval.MetadataError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for b, prompt in enumerate(prompts):
        scores = [f"{n}={out['raw'][b, i]:.4f}" for i, n in enumerate(mixer.names)]
        scores += [f"{n}={out['monitor'][b, i]:.4f}" for i, n in enumerate(mixer.monitor)]
        print(f"{args.images[b]}  {prompt!r}  " + "  ".join(scores))


if __name__ == "__main__":
    main()
