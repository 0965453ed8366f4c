"""toy.py: the checker is right on correct scenes and fails deliberately wrong ones; the
prompt split and grammar hold together."""
import random

import numpy as np
import pytest
import torch

import toy


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
    obj = lambda shape, color: {"class": shape, "color": color, "box": [0.0, 0.0, 4.0, 4.0], "area": 12}
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


def test_ddpm_timestep_like_matches_the_flow_noise_level():
    abar = toy.build_pipeline("tiny-unet").scheduler.alphas_cumprod
    sigma = torch.tensor([0.2, 0.4, 0.6, 0.8, 0.9])
    t = toy.ddpm_timestep_like(abar, sigma)
    assert (t[1:] > t[:-1]).all()                                  # noisier flow state -> later timestep
    a = abar[t]
    # the same signal-to-noise ratio, to within the DDPM schedule's spacing (~1% here)
    torch.testing.assert_close((a / (1 - a)).log(), 2 * ((1 - sigma) / sigma).log(), atol=0.05, rtol=0)
    assert toy.ddpm_timestep_like(abar, torch.tensor([0.999999]))[0] == len(abar) - 1   # noisier than t = 999 (sigma > 0.94): its end


@pytest.mark.parametrize("model,sampler", [("tiny-dit", "flow"), ("tiny-unet", "ddim")])
def test_pretrain_writes_a_loadable_pipeline_and_never_overwrites(tmp_path, model, sampler):
    import os
    import subprocess
    import sys
    from models import load_backbone
    out = tmp_path / "tiny"
    cmd = [sys.executable, os.path.join(os.path.dirname(toy.__file__), "toy.py"), "pretrain", "--model", model,
           "--steps", "2", "--batch", "4", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    net = "transformer" if model == "tiny-dit" else "unet"
    assert (out / net / "diffusion_pytorch_model.safetensors").exists()
    b = load_backbone(str(out))
    assert b.sampler == sampler and b.latent_shape == (3, 32, 32)
    before = (out / "model_index.json").stat().st_mtime_ns
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "never overwritten" in r.stderr and "Traceback" not in r.stderr
    assert (out / "model_index.json").stat().st_mtime_ns == before
