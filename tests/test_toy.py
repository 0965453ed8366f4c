"""toy.py: the checker is right on correct scenes and fails deliberately wrong ones; the
prompt split and grammar hold together."""
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import toy

PRETRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pretrain.py")


def test_split_is_fixed_disjoint_and_covers_every_category():
    train, held = toy.prompts("train"), toy.prompts("heldout")
    train_p, held_p = {m["prompt"] for m in train}, {m["prompt"] for m in held}
    assert not train_p & held_p
    assert train_p | held_p == {m["prompt"] for m in toy.all_prompts()}
    assert {m["tag"] for m in held} == set(toy.TAGS) == {m["tag"] for m in train}
    assert [m["prompt"] for m in toy.prompts("heldout")] == [m["prompt"] for m in held]


def test_prompts_parse_back_to_their_metadata():
    for m in toy.all_prompts():
        assert toy.prompt_metadata(m["prompt"]) == m
    meta = toy.prompt_metadata("two red circles")
    assert meta["tag"] == "counting" and meta["include"] == [{"class": "circle", "count": 2, "color": "red"}]
    with pytest.raises(ValueError):
        toy.prompt_metadata("a purple hexagon")


def test_checker_passes_ground_truth_scenes():
    rng = random.Random(0)
    metas = [rng.choice(toy.all_prompts()) for _ in range(600)]
    strict, score = toy.check(toy.render_batch(metas, seed=1), metas)
    assert strict.float().mean() >= 0.99
    assert score[strict].min() == 1.0


def test_scenes_place_objects_by_prompt_and_cell():
    """The world's position prompts ask "left of" only; every scene drawn for one, and
    for its reversed corruption, has the subject in the asked half and the reference in the other;
    a counted group fills the board in reading order."""
    position = [m for m in toy.all_prompts() if m["tag"] == "position"]
    assert {m["include"][1]["position"][0] for m in position} == set(toy.ASKED_RELATIONS)
    assert len(position) == 6 * len(toy.ASKED_RELATIONS)
    rng = random.Random(2)
    metas = [rng.choice(position) for _ in range(100)]
    metas += [toy.corrupt(m, "relation", rng) for m in metas]            # "right of" scenes
    for meta, image in zip(metas, toy.render_batch(metas, seed=3)):
        objects = {o["class"]: o["box"] for o in toy.detect(image)}
        cell = lambda box: int(box[1]) // toy.CELL * toy.GRID + int(box[0]) // toy.CELL
        relation = meta["include"][1]["position"][0]
        subject, reference = objects[meta["include"][1]["class"]], objects[meta["include"][0]["class"]]
        assert toy.in_halves(relation, cell(subject), cell(reference)), meta
    assert toy.in_halves("left of", 4, 6) and not toy.in_halves("left of", 6, 7)   # columns 0-1 | 2-3
    assert toy.in_halves("below", 12, 0) and not toy.in_halves("below", 4, 0)      # rows 2-3 | 0-1
    counting = [m for m in toy.all_prompts() if m["tag"] == "counting"]
    for meta, image in zip(counting, toy.render_batch(counting, seed=4)):
        boxes = sorted((o["box"][1], o["box"][0]) for o in toy.detect(image))
        assert boxes == sorted(tuple(toy.cell_box(c)[1::-1]) for c in range(meta["include"][0]["count"])), meta


@pytest.mark.parametrize("wrong", ["missing", "color", "swap"])
def test_checker_fails_wrong_scenes(wrong):
    rng = random.Random(1)
    pool = [m for m in toy.all_prompts()
            if (wrong != "color" or any(e.get("color") for e in m["include"]))
            and (wrong != "swap" or m["tag"] == "position")]
    metas = [rng.choice(pool) for _ in range(200)]
    images = torch.from_numpy(np.stack([toy.render(m, rng, wrong=wrong) for m in metas])).permute(0, 3, 1, 2)
    strict, score = toy.check(images, metas)
    assert not strict.any()
    assert (score < 1).all() and (score >= 0).all()


def test_partial_credit_orders_errors():
    """An empty image earns nothing; one wrong colour earns more than a missing object."""
    meta = toy.prompt_metadata("a red circle and a blue square")
    rng = random.Random(2)
    render = lambda wrong: torch.from_numpy(toy.render(meta, rng, wrong=wrong)).permute(2, 0, 1)[None]
    empty = torch.zeros(1, 3, 32, 32)
    s_empty, s_missing, s_color, s_ok = (toy.check(x, [meta])[1].item()
                                         for x in (empty, render("missing"), render("color"), render(None)))
    assert s_empty == 0 < s_missing < s_color < s_ok == 1


def test_partial_credit_charges_one_too_many_like_one_too_few():
    """A surplus object of the asked shape costs its count credit once, not also as an extra
    (that double charge pushed counting prompts towards too few objects); an unasked shape costs."""
    obj = lambda shape, color: {"class": shape, "color": color, "box": [1.0, 1.0, 7.0, 7.0], "cell": 0}
    for n in (2, 3, 4):
        meta = toy.prompt_metadata(f"{toy.NUMBERS[n]} red circles")
        under, exact, over = ([obj("circle", "red")] * m for m in (n - 1, n, n + 1))
        (s_under, p_under), (s_exact, p_exact), (s_over, p_over) = (toy.judge(o, meta) for o in (under, exact, over))
        assert (s_under, s_exact, s_over) == (False, True, False)
        assert p_exact == 1.0 and p_under == pytest.approx(1 - 1 / n) and p_over == pytest.approx(p_under)
        s_other, p_other = toy.judge(exact + [obj("square", "red")], meta)
        assert not s_other and p_other == pytest.approx(1 / 1.5)                      # an unasked shape scales it down


def test_noise_specks_are_not_objects():
    meta = toy.prompt_metadata("a green triangle")
    image = torch.from_numpy(toy.render(meta, random.Random(3))).permute(2, 0, 1)
    image[:, 0, 0] = torch.tensor([1.0, 0.0, 0.0])          # a single red pixel
    assert toy.check(image[None], [meta])[0].item()


def test_boards_are_well_formed_and_smudges_are_not():
    rng = random.Random(4)
    metas = [rng.choice(toy.all_prompts()) for _ in range(100)]
    assert all(toy.well_formed(x) for x in toy.render_batch(metas, seed=4))
    assert all(toy.well_formed(x) for x in toy.random_scenes(100, seed=4))
    image = toy.render_batch([toy.prompt_metadata("a red square")], seed=5)[0]
    cell = toy.detect(image)[0]["cell"]
    y, x = divmod(cell, toy.GRID)
    image[:, y * toy.CELL + 1:y * toy.CELL + 4, x * toy.CELL + 1:x * toy.CELL + 7] = 0     # half a square
    assert not toy.well_formed(image)


def test_caption_corruptions_occur_at_their_stated_rates_and_are_wrong():
    """caption_scene: truthful with the stated probability, else one applicable corruption chosen
    uniformly; a corrupted scene never passes its caption."""
    rng = random.Random(0)
    metas = toy.all_prompts()
    n, truthful = 6000, 0.4
    kinds, applicable, wrong_passes = [], [], 0
    for i in range(n):
        meta = metas[i % len(metas)]
        scene, kind = toy.caption_scene(meta, truthful, rng)
        kinds.append(kind)
        if kind is None:
            assert scene is meta
            continue
        applicable.append([k for k in toy.CORRUPTIONS if toy.corrupt(meta, k, random.Random(0)) is not None])
        assert kind in applicable[-1]
        wrong_passes += bool(toy.check(toy.render_batch([scene], seed=i), [meta])[0][0])
    assert wrong_passes == 0
    assert abs(kinds.count(None) / n - truthful) < 4 * (truthful * (1 - truthful) / n) ** 0.5
    corrupted = [k for k in kinds if k is not None]
    for kind in toy.CORRUPTIONS:       # uniform among the kinds that apply to each caption
        expected = sum(kind in a and 1 / len(a) for a in applicable)
        assert abs(corrupted.count(kind) - expected) < 4 * expected ** 0.5 + 1, kind
    assert {k for a in applicable for k in a} == set(toy.CORRUPTIONS)


def test_shipped_vae_round_trips_every_prompt():
    """The checker passes >= 0.99 of decode(encode(render(prompt))) for every prompt (8 scenes each)."""
    from diffusers import AutoencoderKL
    import pretrain
    from models import MODELS
    vae = AutoencoderKL.from_pretrained(os.path.join(MODELS["tiny-dit"], "vae")).eval()
    metas = toy.all_prompts() * 8
    assert pretrain.vae_round_trip(vae, metas, seed=0) >= 0.99
    for name in ("tiny-dit", "tiny-unet"):      # both models share the one autoencoder
        other = AutoencoderKL.from_pretrained(os.path.join(MODELS[name], "vae"))
        assert other.config.scaling_factor == vae.config.scaling_factor


def test_ddpm_timestep_like_matches_the_flow_noise_level():
    from diffusers import DDIMScheduler
    from models import ddpm_timestep_like
    abar = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    sigma = torch.tensor([0.2, 0.4, 0.6, 0.8, 0.9])
    t = ddpm_timestep_like(abar, sigma)
    assert (t[1:] > t[:-1]).all()                                  # noisier flow state -> later timestep
    a = abar[t]
    # the same signal-to-noise ratio, to within the DDPM schedule's spacing (~1% here)
    torch.testing.assert_close((a / (1 - a)).log(), 2 * ((1 - sigma) / sigma).log(), atol=0.05, rtol=0)
    assert ddpm_timestep_like(abar, torch.tensor([0.999999]))[0] == len(abar) - 1   # noisier than t = 999 (sigma > 0.94): its end


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "vae"
    r = subprocess.run([sys.executable, PRETRAIN, "--model", "vae", "--steps", "2", "--decoder-steps", "1", "--batch", "4",
                        "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "diffusion_pytorch_model.safetensors").exists()
    return out


@pytest.mark.parametrize("model,sampler", [("tiny-dit", "flow"), ("tiny-unet", "ddim")])
def test_pretrain_writes_a_loadable_pipeline_and_never_overwrites(tmp_path, tiny_vae, model, sampler):
    from models import load_backbone
    out = tmp_path / "tiny"
    cmd = [sys.executable, PRETRAIN, "--model", model, "--vae", str(tiny_vae),
           "--steps", "2", "--batch", "4", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    net = "transformer" if model == "tiny-dit" else "unet"
    assert (out / net / "diffusion_pytorch_model.safetensors").exists()
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").exists()
    b = load_backbone(str(out))
    assert b.sampler == sampler and b.latent_shape == (4, 4, 4)
    assert b.decode(torch.zeros(1, *b.latent_shape)).shape == (1, 3, 32, 32)
    before = (out / "model_index.json").stat().st_mtime_ns
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "never overwritten" in r.stderr and "Traceback" not in r.stderr
    assert (out / "model_index.json").stat().st_mtime_ns == before
    if model == "tiny-dit":                       # --init continues from a saved pipeline
        from safetensors.torch import load_file
        more = tmp_path / "more"
        r = subprocess.run([sys.executable, PRETRAIN, "--model", model, "--init", str(out), "--steps", "1", "--batch", "4",
                            "--out", str(more)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        w0, w1 = (load_file(str(d / net / "diffusion_pytorch_model.safetensors")) for d in (out, more))
        assert w0.keys() == w1.keys() and any(not torch.equal(w0[k], w1[k]) for k in w0)
        assert all((w0[k] - w1[k]).abs().max() < 0.05 for k in w0)          # a step away, not a fresh model
