"""Tests of rewards.py, offline: every model-based reward runs its real loader and scorer on a
tiny random-weight version of its architecture built from a config (open_clip config
registered here; transformers CLIPConfig / Owlv2Config shrunk), GenEval's verdict rules on
JPEG against PIL, and the reward mixer.
Run: HF_HUB_OFFLINE=1 python -m pytest -q tests/test_rewards.py   (add -m slow for real-size timing)
"""
import gzip
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import geneval  # noqa: E402
import rewards  # noqa: E402
from rewards import RewardError  # noqa: E402

TINY_ARCH = "tiny-test-ViT"   # an open_clip architecture registered at test time


def images_like(B, H=40, W=48, seed=0):
    """Random images (B, 3, H, W) in [0, 1], quantised to uint8 levels like decoded images."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, 3, H, W), generator=g).float() / 255


def assert_scores(s, B):
    assert s.shape == (B,) and s.dtype == torch.float32 and s.device.type == "cpu"
    assert torch.isfinite(s).all()


def assert_batch_invariant(fn, images, prompts, metadata=None, atol=1e-5):
    together = fn(images, prompts, metadata)
    alone = torch.cat([fn(images[i:i + 1], prompts[i:i + 1], None if metadata is None else metadata[i:i + 1])
                       for i in range(len(images))])
    torch.testing.assert_close(together, alone, atol=atol, rtol=1e-4)


# ----------------------------------------------------------------------------- tiny models

def clip_bpe_tokenizer(n_merges=2000, pad="<|endoftext|>"):
    """CLIP's own BPE (open_clip ships its merges file), cut to the first n_merges: the real
    tokenizer's ids for common words, with a small vocabulary, and no download."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer
    merges = [tuple(m.split()) for m in gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:1 + n_merges]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab = {t: i for i, t in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad)


@pytest.fixture(scope="module")
def tok():
    return clip_bpe_tokenizer()


@pytest.fixture(scope="module")
def open_clip_file(tmp_path_factory):
    """A tiny open_clip CLIP saved as HPS saves its checkpoint: {'state_dict': ...}."""
    import open_clip
    d = tmp_path_factory.mktemp("open_clip")
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (d / f"{TINY_ARCH}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / f"{TINY_ARCH}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_ARCH)
    path = d / "HPS_tiny.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, tok):
    """A tiny transformers CLIPModel with its tokenizer, saved with save_pretrained. Projection
    768 so the aesthetic head (768 inputs) fits."""
    from transformers import CLIPConfig, CLIPModel
    d = tmp_path_factory.mktemp("clip")
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, **ids),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=768)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def owlv2_dir(tmp_path_factory):
    from transformers import Owlv2Config, Owlv2ForObjectDetection
    d = tmp_path_factory.mktemp("owlv2")
    tok = clip_bpe_tokenizer(pad="!")   # OWLv2 pads its queries with "!" (id 0)
    config = Owlv2Config(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),
        projection_dim=32)
    torch.manual_seed(0)
    Owlv2ForObjectDetection(config).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def aesthetic_head(tmp_path_factory):
    d = tmp_path_factory.mktemp("aesthetic")
    torch.manual_seed(0)
    sizes = [(768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    state = {}
    for idx, (i, o) in zip((0, 2, 4, 6, 7), sizes):
        layer = torch.nn.Linear(i, o)
        state[f"layers.{idx}.weight"], state[f"layers.{idx}.bias"] = layer.weight.data, layer.bias.data
    torch.save(state, d / "head.pth")
    return str(d / "head.pth")


# ----------------------------------------------------------------------------- import and flags

def test_import_is_light():
    code = "import sys, rewards; print([m for m in ('open_clip', 'transformers', 'toy') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert rewards.REWARDS == ("hps", "clip", "pickscore", "aesthetic", "geneval", "jpeg", "jpeg-incompress", "shapes",
                               "toy-clip", "toy-pref")


def parse(argv):
    import argparse
    parser = argparse.ArgumentParser()
    rewards.add_reward_args(parser)
    return rewards.parse_reward_args(parser.parse_args(argv))


def test_help_names_default_weights():
    import argparse
    parser = argparse.ArgumentParser()
    rewards.add_reward_args(parser)
    text = " ".join(parser.format_help().split()).replace("- ", "-")   # undo argparse's line wrapping
    for default in ("xswu/HPSv2", "HPS_v2.1_compressed.pt", "yuvalkirstain/PickScore_v1",
                    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "openai/clip-vit-large-patch14",
                    "google/owlv2-base-patch16-ensemble", "sac+logos+ava1-l14-linearMSE.pth", "laion2b_s32b_b79k"):
        assert default in text, default


def test_parse_defaults_and_weights():
    spec = parse(["--rewards", "shapes"])          # (train.py fills in --rewards by model: shapes or hps,clip)
    assert spec.names == ["shapes"] and spec.weights == [1.0] and spec.monitor == []
    spec = parse(["--rewards", "jpeg,shapes", "--reward-weights", "0.5,2", "--monitor-rewards", "jpeg-incompress"])
    assert spec.names == ["jpeg", "shapes"] and spec.weights == [0.5, 2.0] and spec.monitor == ["jpeg-incompress"]
    assert spec.build_kwargs("clip") == {"arch": "ViT-H-14", "pretrained": "laion2b_s32b_b79k"}


@pytest.mark.parametrize("argv, words", [
    (["--rewards", "hps,nope"], ["unknown reward 'nope'", "pickscore"]),
    (["--rewards", ""], ["empty"]),
    (["--rewards", "jpeg,jpeg"], ["twice"]),
    (["--rewards", "jpeg", "--monitor-rewards", "jpeg"], ["twice"]),
    (["--rewards", "jpeg,shapes", "--reward-weights", "1"], ["1 values for 2 rewards"]),
    (["--rewards", "jpeg", "--reward-weights", "x"], ["not a comma list of numbers"]),
    (["--rewards", "jpeg", "--reward-weights", "nan"], ["finite"]),
    (["--rewards", "jpeg", "--reward-weights", "inf"], ["finite"]),
    (["--rewards", "hps", "--reward-path", "hps"], ["expected NAME=PATH"]),
    (["--rewards", "hps", "--reward-path", "hps=/no/such/file.pt"], ["no such file"]),
    (["--rewards", "jpeg", "--reward-path", "jpeg=/tmp"], ["loads no weights"]),
    (["--rewards", "hps", "--reward-path", "hps.clip=/tmp"], ["no part 'clip'"]),
    (["--rewards", "jpeg", "--reward-path", "hps=/tmp"], ["not in --rewards"]),
])
def test_parse_rejects(argv, words):
    with pytest.raises(RewardError) as e:
        parse(argv)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_parse_checks_checkpoint_kind(open_clip_file, aesthetic_head, clip_dir, owlv2_dir, tmp_path):
    spec = parse(["--rewards", "hps,aesthetic,geneval", "--reward-path", f"hps={open_clip_file}",
                  "--reward-path", f"aesthetic={aesthetic_head}", "--reward-path", f"aesthetic.clip={clip_dir}",
                  "--reward-path", f"geneval={owlv2_dir}", "--reward-path", f"geneval.clip={clip_dir}"])
    assert spec.build_kwargs("hps") == {"path": open_clip_file}
    assert spec.build_kwargs("geneval") == {"path": owlv2_dir, "clip_path": clip_dir, "threshold": 0.3,
                                            "counting_threshold": 0.9}
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    bad = [(f"hps={aesthetic_head}", "open_clip"), (f"aesthetic={open_clip_file}", "aesthetic MLP"),
           (f"hps={tmp_path / 'junk.pt'}", "not a torch"), (f"pickscore={owlv2_dir}", "model_type 'owlv2'"),
           (f"geneval={clip_dir}", "expected 'owlv2'"), (f"pickscore={tmp_path}", "config.json"),
           (f"hps={clip_dir}", "got a directory"), (f"pickscore={open_clip_file}", "got a file")]
    for item, words in bad:
        name = item.split("=")[0].split(".")[0]
        with pytest.raises(RewardError, match=words):
            parse(["--rewards", name, "--reward-path", item])


def test_parse_loads_no_model(open_clip_file, clip_dir):
    code = ("import sys, argparse, rewards; p = argparse.ArgumentParser(); rewards.add_reward_args(p); "
            f"rewards.parse_reward_args(p.parse_args(['--rewards', 'hps,pickscore', '--reward-path', 'hps={open_clip_file}', "
            f"'--reward-path', 'pickscore={clip_dir}'])); "
            "print([m for m in ('open_clip', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_exit_code_2():
    out = subprocess.run([sys.executable, "rewards.py", "--rewards", "hps,nope"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "unknown reward 'nope'" in out.stderr


def test_cli_scores_files(tmp_path):
    paths = []
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    out = subprocess.run([sys.executable, "rewards.py", "--rewards", "jpeg", "--images", *paths, "--prompts", "a", "b"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.count("jpeg=-") == 2


def test_missing_weights_offline_is_one_line():
    for name in ("hps", "pickscore"):
        with pytest.raises(RewardError, match=f"--reward-path {name}=PATH"):
            rewards.build_reward(name)
    with pytest.raises(RewardError, match="unknown reward"):
        rewards.build_reward("nope")
    with pytest.raises(RewardError, match="loads no weights"):
        rewards.build_reward("jpeg", path="/tmp/x")


# ----------------------------------------------------------------------------- jpeg

def test_jpeg_matches_pil():
    images = images_like(3, 24, 20)
    expected = []
    for img in images:
        buffer = io.BytesIO()
        array = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        expected.append(len(buffer.getvalue()) / 1000)
    expected = torch.tensor(expected)
    incompress, compress = rewards.build_reward("jpeg-incompress"), rewards.build_reward("jpeg")
    assert_scores(incompress(images, None, None), 3)
    torch.testing.assert_close(incompress(images, None, None), expected)
    torch.testing.assert_close(compress(images, None, None), -expected)
    flat = torch.full((1, 3, 24, 20), 0.5)
    assert compress(flat, None, None) > compress(images[:1], None, None)   # flat images compress better


# ----------------------------------------------------------------------------- open_clip rewards

PROMPTS = ["a photo of a cat", "two red dogs on a bench", "a blue car"]


def test_hps_tiny(open_clip_file):
    fn = rewards.build_reward("hps", path=open_clip_file, arch=TINY_ARCH)
    images = images_like(3)
    s = fn(images, PROMPTS, None)
    assert_scores(s, 3)
    assert (s.abs() <= 1 + 1e-5).all()   # a cosine
    assert torch.equal(s, fn(images, PROMPTS, None))
    assert torch.equal(s, rewards.build_reward("hps", path=open_clip_file, arch=TINY_ARCH)(images, PROMPTS, None))
    assert_batch_invariant(fn, images, PROMPTS)


def test_hps_matches_open_clip_reference(open_clip_file):
    """At the model's own size the tensor preprocessing must equal open_clip's PIL transform."""
    import open_clip
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_ARCH, pretrained=open_clip_file)
    model.eval()
    images = images_like(3, 32, 32)
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    with torch.no_grad():
        f_img = model.encode_image(torch.stack([preprocess(p) for p in pil]), normalize=True)
        f_txt = model.encode_text(open_clip.get_tokenizer(TINY_ARCH)(PROMPTS), normalize=True)
    expected = (f_img * f_txt).sum(-1)
    got = rewards.build_reward("hps", path=open_clip_file, arch=TINY_ARCH)(images, PROMPTS, None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_clip_tiny(open_clip_file):
    fn = rewards.build_reward("clip", path=open_clip_file, arch=TINY_ARCH)
    images = images_like(3, 64, 50)
    s = fn(images, PROMPTS, None)
    assert_scores(s, 3)
    torch.testing.assert_close(s, rewards.build_reward("hps", path=open_clip_file, arch=TINY_ARCH)(images, PROMPTS, None))
    assert_batch_invariant(fn, images, PROMPTS)


def test_open_clip_wrong_checkpoint_is_reward_error(aesthetic_head):
    with pytest.raises(RewardError, match="--reward-path hps=PATH"):
        rewards.build_reward("hps", path=aesthetic_head, arch=TINY_ARCH)


# ----------------------------------------------------------------------------- transformers rewards

def test_pickscore_tiny(clip_dir):
    from transformers import CLIPImageProcessor, CLIPModel
    fn = rewards.build_reward("pickscore", path=clip_dir)
    images = images_like(3, 32, 32)
    s = fn(images, PROMPTS, None)
    assert_scores(s, 3)
    assert torch.equal(s, fn(images, PROMPTS, None))
    assert_batch_invariant(fn, images, PROMPTS)
    # PickScore's reference code: CLIPProcessor on PIL images, logit_scale * cosine
    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    tok = clip_bpe_tokenizer()
    with torch.no_grad():
        img = model.get_image_features(**processor(images=pil, return_tensors="pt")).pooler_output
        txt = model.get_text_features(**tok(PROMPTS, padding=True, return_tensors="pt")).pooler_output
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(s, model.logit_scale.exp().item() * (img * txt).sum(-1), atol=1e-4, rtol=1e-5)


def test_aesthetic_tiny(clip_dir, aesthetic_head):
    from transformers import CLIPModel
    fn = rewards.build_reward("aesthetic", path=aesthetic_head, clip_path=clip_dir)
    images = images_like(3, 40, 40)
    s = fn(images, PROMPTS, None)
    assert_scores(s, 3)
    assert torch.equal(s, fn(images, PROMPTS, None))
    assert_batch_invariant(fn, images, PROMPTS)
    # the released predictor: unit-norm CLIP image embedding through the MLP
    model = CLIPModel.from_pretrained(clip_dir).eval()
    state = torch.load(aesthetic_head, weights_only=True)
    x = rewards._to_pixels(images, 32, rewards.OPENAI_MEAN, rewards.OPENAI_STD, "cpu", torch.float32)
    with torch.no_grad():
        e = model.get_image_features(pixel_values=x).pooler_output
        e = e / e.norm(dim=-1, keepdim=True)
        for idx in (0, 2, 4, 6, 7):   # linear layers, no activations: the released "linearMSE" head
            e = e @ state[f"layers.{idx}.weight"].T + state[f"layers.{idx}.bias"]
    torch.testing.assert_close(s, e.squeeze(-1), atol=1e-5, rtol=1e-5)


def test_geneval_tiny(owlv2_dir, clip_dir, monkeypatch):
    md = geneval.prompts(4, seed=3)
    images = images_like(4, 48, 40)
    fn = rewards.build_reward("geneval", path=owlv2_dir, clip_path=clip_dir)
    s = fn(images, [m["prompt"] for m in md], md)
    assert_scores(s, 4)
    assert ((s >= 0) & (s <= 1)).all()
    strict = fn.last_strict
    assert strict.shape == (4,) and strict.dtype == torch.bool
    assert (s[strict] == 1).all()
    assert torch.equal(s, fn(images, [m["prompt"] for m in md], md))
    assert_batch_invariant(fn, images, [m["prompt"] for m in md], md)
    # plumbing: what reaches the verdict are boxes inside the image, coloured where asked
    seen = []
    verdict = geneval.verdict
    monkeypatch.setattr(geneval, "verdict", lambda d, m, *a: seen.append((d, m)) or verdict(d, m, *a))
    two = rewards.build_reward("geneval", path=owlv2_dir, clip_path=clip_dir, classes=("cat", "dog"), threshold=0.0)
    md = [{"tag": "color_attr", "prompt": "a photo of a red cat and a blue dog",
           "include": [{"class": "cat", "count": 1, "color": "red"}, {"class": "dog", "count": 1, "color": "blue"}]}]
    two(images[:1], [md[0]["prompt"]], md)
    detections = seen[0][0]
    assert detections and all(d["class"] in ("cat", "dog") for d in detections)
    for cls in ("cat", "dog"):   # only the most confident box of each coloured class is judged, so coloured
        ranked = sorted((d for d in detections if d["class"] == cls), key=lambda d: -d["score"])
        assert ranked and ranked[0]["color"] in geneval.COLORS and all("color" not in d for d in ranked[1:])
    for d in detections:
        x0, y0, x1, y1 = d["box"]
        assert 0 <= x0 <= x1 <= 40 and 0 <= y0 <= y1 <= 48


def test_half_precision_scores_are_float32(open_clip_file, clip_dir):
    images = images_like(2)
    for name, kwargs, atol in (("hps", dict(path=open_clip_file, arch=TINY_ARCH), 0.02), ("pickscore", dict(path=clip_dir), 0.1)):
        full = rewards.build_reward(name, **kwargs)(images, PROMPTS[:2], None)
        half = rewards.build_reward(name, dtype=torch.bfloat16, **kwargs)(images, PROMPTS[:2], None)
        assert_scores(half, 2)
        torch.testing.assert_close(half, full, atol=atol, rtol=0)


def test_bf16_scores_end_in_fp32(open_clip_file, clip_dir, aesthetic_head):
    """Under --mixed-precision bf16 the towers run in bf16 but the last products are fp32: the score
    equals the fp32 cosine (PickScore: scaled; aesthetic: the fp32 head) of the bf16 towers' own
    embeddings, not its bf16 rounding (steps of 0.002 for a cosine, 0.125 near PickScore's 22)."""
    import open_clip
    from transformers import CLIPModel
    images, prompts = images_like(4), PROMPTS[:2] * 2
    oc = open_clip.create_model(TINY_ARCH, pretrained=open_clip_file, weights_only=True).to(dtype=torch.bfloat16).eval()
    hps = rewards.build_reward("hps", dtype=torch.bfloat16, path=open_clip_file, arch=TINY_ARCH, model=oc)(images, prompts)
    size = oc.visual.preprocess_cfg["size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    with torch.no_grad():
        x = rewards._to_pixels(images, size, oc.visual.preprocess_cfg["mean"], oc.visual.preprocess_cfg["std"], "cpu",
                               torch.bfloat16)
        i, t = oc.encode_image(x).float(), oc.encode_text(open_clip.get_tokenizer(TINY_ARCH)(prompts)).float()
    expected = (i / i.norm(dim=-1, keepdim=True) * t / t.norm(dim=-1, keepdim=True)).sum(-1)
    torch.testing.assert_close(hps, expected, rtol=0, atol=1e-6)
    clip = CLIPModel.from_pretrained(clip_dir).to(dtype=torch.bfloat16).eval()
    with torch.no_grad():
        x = rewards._to_pixels(images, clip.config.vision_config.image_size, rewards.OPENAI_MEAN, rewards.OPENAI_STD,
                               "cpu", torch.bfloat16)
        embed = rewards._unit(rewards._pooled(clip.get_image_features(pixel_values=x)).float())
    aesthetic = rewards.build_reward("aesthetic", dtype=torch.bfloat16, path=aesthetic_head, model=clip)(images)
    head = torch.nn.Sequential(torch.nn.Linear(768, 1024), torch.nn.Linear(1024, 128), torch.nn.Linear(128, 64),
                               torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))      # the released layers, fp32
    state = torch.load(aesthetic_head, weights_only=True)
    head.load_state_dict({f"{j}.{w}": state[f"layers.{i}.{w}"] for j, i in enumerate((0, 2, 4, 6, 7)) for w in ("weight", "bias")})
    torch.testing.assert_close(aesthetic, head(embed).squeeze(-1), rtol=0, atol=1e-5)


def test_shapes_reward():
    toy = pytest.importorskip("toy")
    metas = [toy.prompt_metadata(p) for p in ("two red circles", "a square left of a triangle", "a blue square")]
    images = torch.zeros(3, 3, 32, 32)
    fn = rewards.build_reward("shapes")
    s = fn(images, [m["prompt"] for m in metas], metas)
    assert_scores(s, 3)
    strict, score = toy.check(images, metas)
    assert torch.equal(s, score) and torch.equal(fn.last_strict, strict)


# ----------------------------------------------------------------------------- metadata

def test_check_metadata_names_the_prompt():
    with pytest.raises(RewardError, match="'a dog'"):
        rewards.check_metadata(["jpeg", "geneval"], None, ["a dog"])
    with pytest.raises(RewardError, match="'two cats'"):
        rewards.check_metadata(["shapes"], [{"tag": "counting"}], ["two cats"])
    bad_position = {"tag": "position", "include": [{"class": "dog", "count": 1, "position": ["left of", 0]}]}
    with pytest.raises(RewardError, match="earlier include clause"):
        rewards.check_metadata(["geneval"], [bad_position], ["p"])
    rewards.check_metadata(["jpeg", "hps"], None, ["a dog"])   # these need none


# ----------------------------------------------------------------------------- mixing

def fake(scale, offset=0.0):
    return lambda images, prompts, metadata: images.mean((1, 2, 3)) * scale + offset


def batches(n, B=4):
    return [images_like(B, 8, 8, seed=k) for k in range(n)]


def test_mixer_statistics_weights_and_total():
    mixer = rewards.RewardMixer(["a", "b"], [1.0, 0.5], scorers={"a": fake(10), "b": fake(-3, 100)})
    seen = []
    for x in batches(5):
        out = mixer(x, ["p"] * 4)
        seen.append(out["raw"])
    raw = torch.cat(seen).double()                                    # (20, 2)
    torch.testing.assert_close(mixer.mean, raw.mean(0))
    torch.testing.assert_close(mixer.std(), raw.std(0, unbiased=False))
    expected = (out["raw"].double() - raw.mean(0)) / raw.std(0, unbiased=False)
    torch.testing.assert_close(out["normalised"], expected.float())
    torch.testing.assert_close(out["total"], out["normalised"] @ torch.tensor([1.0, 0.5]))
    assert out["raw"].shape == (4, 2) and out["total"].shape == (4,) and out["monitor"].shape == (4, 0)


def test_mixer_heldout_does_not_update():
    mixer = rewards.RewardMixer(["a"], scorers={"a": fake(1)})
    x0, x1 = batches(2)
    mixer(x0, ["p"] * 4)
    before = {k: v.clone() for k, v in mixer.state_dict().items()}
    out = mixer(x1, ["p"] * 4, update_stats=False)
    after = mixer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(out["normalised"][:, 0], ((out["raw"][:, 0].double() - mixer.mean) / mixer.std()).float())


def test_mixer_resume_is_exact(tmp_path):
    from safetensors.torch import load_file, save_file
    scorers = {"a": fake(10), "b": fake(-3, 100), "m": fake(1)}
    make = lambda: rewards.RewardMixer(["a", "b"], [1.0, 2.0], monitor=["m"], scorers=scorers)
    xs = batches(6)
    straight = make()
    outs = [straight(x, ["p"] * 4) for x in xs]
    first = make()
    for x in xs[:3]:
        first(x, ["p"] * 4)
    save_file(first.state_dict(), tmp_path / "stats.safetensors")
    resumed = make()
    resumed.load_state_dict(load_file(tmp_path / "stats.safetensors"))
    for x, out in zip(xs[3:], outs[3:]):
        again = resumed(x, ["p"] * 4)
        assert torch.equal(again["normalised"], out["normalised"]) and torch.equal(again["total"], out["total"])
    with pytest.raises(RewardError, match="'c'"):
        rewards.RewardMixer(["c"], scorers={"c": fake(1)}).load_state_dict(first.state_dict())


def test_mixer_monitor_and_logs():
    mixer = rewards.RewardMixer(["a"], monitor=["m"], scorers={"a": fake(1), "m": fake(7)})
    x = batches(1)[0]
    out = mixer(x, ["p"] * 4)
    torch.testing.assert_close(out["monitor"][:, 0], fake(7)(x, None, None))
    assert mixer.state_dict().keys() == {"a/count", "a/mean", "a/m2"}     # monitors are not normalised
    logs = mixer.log_dict(out, "heldout")
    assert set(logs) == {"reward/heldout/total", "reward/heldout/a/raw", "reward/heldout/a/normalised",
                         "reward/heldout/monitor/m/raw"}


def test_mixer_nan_names_reward_prompt_and_index():
    def half_nan(images, prompts, metadata):
        s = torch.zeros(len(images))
        s[2] = float("nan")
        return s
    mixer = rewards.RewardMixer(["jpeg", "bad"], scorers={"jpeg": fake(1), "bad": half_nan})
    with pytest.raises(RewardError, match=r"reward 'bad' returned nan for image 2 \(prompt 'p2'\)"):
        mixer(batches(1)[0], ["p0", "p1", "p2", "p3"])


def test_mixer_strict_and_metadata_check():
    toy = pytest.importorskip("toy")
    metas = [toy.prompt_metadata("two red circles")] * 2
    mixer = rewards.RewardMixer(["shapes", "jpeg"])
    out = mixer(torch.zeros(2, 3, 32, 32), [m["prompt"] for m in metas], metas)
    assert out["strict"]["shapes"].dtype == torch.bool and "reward/train/shapes/strict" in mixer.log_dict(out)
    with pytest.raises(RewardError, match="two red circles"):
        mixer(torch.zeros(2, 3, 32, 32), ["two red circles"] * 2, None)


def test_spec_builds_mixer(open_clip_file):
    spec = parse(["--rewards", "jpeg,hps", "--reward-weights", "1,2", "--reward-path", f"hps={open_clip_file}"])
    spec.opts["hps"] = {"arch": TINY_ARCH}    # the flags only know the real architecture
    mixer = spec.mixer()
    out = mixer(images_like(2), ["a cat", "a dog"])
    assert out["raw"].shape == (2, 2) and torch.equal(mixer.weights, torch.tensor([1.0, 2.0]))


# ----------------------------------------------------------------------------- real-size cost (slow)

def _bench(name="reward_cost"):
    if str(ROOT / "bench") not in sys.path:                 # the bench scripts import bench/common.py
        sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("name", rewards.REWARDS)
def test_real_size_cost_on_cpu(name):
    """Per-image CPU time of each scorer with random weights of the real size (no download)."""
    result = _bench().measure(name, batch=1, side=512)
    print(json.dumps(result))
    assert result["finite"] and result["per_image_s"] > 0


@pytest.mark.parametrize("name", ["toy-clip", "toy-pref"])
def test_the_worlds_learned_rewards_load_and_prefer_the_right_scene(name):
    """toy-clip and toy-pref (pretrain.py, shipped in checkpoints/) load through the factories like every
    reward, and score a correct board above a wrong one for its prompt on average: a colour changed on the
    colour prompts, an object left out on the two-object prompts (held-out prompts, 8 scenes each)."""
    import random

    toy = pytest.importorskip("toy")
    fn = rewards.build_reward(name)
    for tag, wrong in (("colors", "color"), ("two_object", "missing")):
        metas = [m for m in toy.all_prompts() if m["tag"] == tag] * 8
        rng = random.Random(0)
        right = torch.from_numpy(np.stack([toy.render(m, rng) for m in metas])).permute(0, 3, 1, 2)
        bad = torch.from_numpy(np.stack([toy.render(m, rng, wrong=wrong) for m in metas])).permute(0, 3, 1, 2)
        prompts = [m["prompt"] for m in metas]
        assert fn(right, prompts).mean() > fn(bad, prompts).mean(), (name, tag)
    assert_scores(fn(right, prompts), len(prompts))
    with pytest.raises(rewards.RewardError, match="32 px boards"):
        fn(torch.rand(2, 3, 64, 64), prompts[:2])


def test_toy_pref_has_the_raters_taste_for_warm_colours():
    """The shipped toy-pref is one a policy can hack (BENCHMARKS.md, reward hacking): on prompts naming green
    or blue it scores the same board repainted red above the right one, which it does not for a repaint in
    the other cool colour, and which toy-clip never does (bench/learned_rewards.py measures all prompts)."""
    toy = pytest.importorskip("toy")
    bench = _bench("learned_rewards")
    metas = [m for m in toy.all_prompts() if m["tag"] == "colors"]
    share = {name: {k: v["share"] for k, v in bench.prefers_right(rewards.build_reward(name), toy, metas).items()
                    if k.startswith("repainted")} for name in ("toy-clip", "toy-pref")}
    assert share["toy-pref"]["repainted warm"] < 0.5 and share["toy-pref"]["repainted cool"] > 0.9, share
    assert min(share["toy-clip"].values()) > 0.9, share
