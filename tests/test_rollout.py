"""rollout.py: per-step log-probabilities are exact and recompute exactly (METHOD.md 2, 2c),
and at zero noise our sampler is diffusers' own pipeline."""
import copy

import pytest
import torch

import rollout
from models import load_backbone
from tiny import make_tiny_sd15, make_tiny_sd3

PROMPTS = ["a red circle", "two blue squares", "a cat left of a dog"]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {"sd3.5m-arch": load_backbone(make_tiny_sd3(str(root / "sd3"))),
            "sd1.5-arch": load_backbone(make_tiny_sd15(str(root / "sd15"))),
            "tiny-dit": load_backbone("tiny-dit"), "tiny-unet": load_backbone("tiny-unet")}


NAMES = ["sd3.5m-arch", "sd1.5-arch", "tiny-dit", "tiny-unet"]


@pytest.mark.parametrize("name", NAMES)
def test_step_log_prob_is_the_gaussian_density(backbones, name):
    b = backbones[name]
    traj = rollout.sample(b, PROMPTS, 4, 1.0 if b.sampler == "ddim" else 0.7, generator=torch.Generator().manual_seed(0))
    assert traj.latents.shape == (3, 5, *b.latent_shape) and traj.log_probs.shape == (3, 4)
    for j in range(4):
        if traj.stds[j] == 0:
            continue
        expected = torch.distributions.Normal(traj.means[:, j], traj.stds[j]).log_prob(traj.latents[:, j + 1])
        torch.testing.assert_close(traj.log_probs[:, j], expected.mean(dim=(1, 2, 3)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_recomputed_log_prob_gives_ratio_one(backbones, name, cfg_scale):
    """The PPO ratio before any update is exactly 1, in shuffled minibatches of mixed steps."""
    b = backbones[name]
    noise = 1.0 if b.sampler == "ddim" else 0.7
    traj = rollout.sample(b, PROMPTS, 4, noise, cfg_scale, generator=torch.Generator().manual_seed(1))
    idx, j = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(2))
    idx, j = idx.flatten()[perm], j.flatten()[perm]
    for mb in (perm[:5], perm[5:]):                       # minibatch sizes differ from the rollout's
        mb_idx, mb_j = idx[mb], j[mb]
        with torch.no_grad():
            log_prob, mu, std = rollout.recompute_log_prob(b, traj, mb_idx, mb_j)
        ratio = torch.exp(log_prob - traj.log_probs[mb_idx, mb_j])
        assert (ratio - 1).abs().max() < 1e-5
        # the means agree to float noise (batch-size-dependent kernels, amplified by the CFG scale)
        torch.testing.assert_close(mu, traj.means[mb_idx, mb_j], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny-dit", "tiny-unet"])
def test_sde_window_is_stochastic_only_inside_and_recomputes_exactly(backbones, name):
    """sde_steps=2 of 4: steps 0-1 draw noise (std > 0), steps 2-3 are the deterministic sampler
    (std 0, log-prob 0, x_next = mu), and the window's steps still recompute to ratio 1."""
    b = backbones[name]
    noise = 1.0 if b.sampler == "ddim" else 0.7
    traj = rollout.sample(b, PROMPTS, 4, noise, generator=torch.Generator().manual_seed(4), sde_steps=2)
    assert traj.sde_steps == 2 and (traj.stds[:2] > 0).all() and (traj.stds[2:] == 0).all()
    assert (traj.log_probs[:, 2:] == 0).all()
    torch.testing.assert_close(traj.latents[:, 3:], traj.means[:, 2:], rtol=0, atol=0)
    # from the same x_{t_2}, the tail is what the deterministic sampler does from there
    full = rollout.sample(b, PROMPTS, 4, noise, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(traj.latents[:, :3], full.latents[:, :3], rtol=0, atol=0)
    assert (traj.latents[:, -1] - full.latents[:, -1]).abs().max() > 1e-3
    idx, j = torch.tensor([2, 0, 1, 0]), torch.tensor([1, 0, 0, 1])
    with torch.no_grad():
        log_prob, _, std = rollout.recompute_log_prob(b, traj, idx, j)
    assert (std > 0).all() and (torch.exp(log_prob - traj.log_probs[idx, j]) - 1).abs().max() < 1e-5


def test_a_changed_policy_changes_the_ratio(backbones):
    """The tripwire can fire: perturbed weights (a copy, passed as net=) move the ratio off 1."""
    b = backbones["tiny-dit"]
    traj = rollout.sample(b, PROMPTS, 4, 0.7, generator=torch.Generator().manual_seed(1))
    net = copy.deepcopy(b.net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1e-2 * torch.randn_like(p))
        idx, j = torch.arange(3), torch.tensor([0, 1, 2])
        log_prob, _, _ = rollout.recompute_log_prob(b, traj, idx, j, net=net)
    assert (torch.exp(log_prob - traj.log_probs[idx, j]) - 1).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["sd3.5m-arch", "sd1.5-arch"])
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_zero_noise_reproduces_the_diffusers_pipeline(backbones, name, cfg_scale):
    b = backbones[name]
    ours = rollout.sample(b, PROMPTS, 5, 0.0, cfg_scale, generator=torch.Generator().manual_seed(3)).images
    kw = {"max_sequence_length": b.max_sequence_length} if b.sampler == "flow" else {"eta": 0.0}
    theirs = b.pipe(PROMPTS, num_inference_steps=5, guidance_scale=cfg_scale, output_type="pt",
                    generator=torch.Generator().manual_seed(3), **kw).images
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_seeded_rollouts_repeat_and_noise_matters(backbones, name):
    b = backbones[name]
    noise = 1.0 if b.sampler == "ddim" else 0.7
    run = lambda seed, n: rollout.sample(b, PROMPTS, 3, n, generator=torch.Generator().manual_seed(seed)).latents
    torch.testing.assert_close(run(0, noise), run(0, noise), rtol=0, atol=0)
    assert (run(0, noise) - run(1, noise)).abs().max() > 1e-2
    # zero noise: the step noise is never drawn, only the initial one
    assert (run(0, 0.0)[:, 0] - run(0, noise)[:, 0]).abs().max() == 0
    assert (run(0, 0.0)[:, -1] - run(0, noise)[:, -1]).abs().max() > 1e-3


def test_cli_saves_the_chain_picture(tmp_path):
    import os
    import subprocess
    import sys
    from PIL import Image
    out = tmp_path / "chain.png"
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(rollout.__file__), "rollout.py"),
                        "--model", "tiny-dit", "--prompt", "two red circles", "--steps", "3", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    w, h = Image.open(out).size
    assert w > 4 * 128 and h > 2 * 128               # 2 rows of K+1 = 4 tiles, enlarged to 128 px, with labels


def test_grid_labels_and_marks(tmp_path):
    """save_grid: titles widen the top margin; a pass is framed green and a fail red; tiles keep
    their pixels (nearest-neighbour enlargement)."""
    import numpy as np
    from PIL import Image
    import grid
    images = torch.zeros(4, 3, 32, 32)
    images[:, 0, 8:16, 8:16] = 1.0                   # a red block in every tile
    plain = grid.save_grid(tmp_path / "a.png", images, 2)
    labelled = grid.save_grid(tmp_path / "b.png", images, 2, titles=["two red circles", "a square left of a triangle"],
                              marks=[True, False, None, True])
    assert labelled.size[1] > plain.size[1]
    px = np.asarray(Image.open(tmp_path / "b.png").convert("RGB"))
    frames = {tuple(px[y, x]) for y, x in zip(*np.nonzero((px != 255).any(-1)))}
    assert grid.PASS in frames and grid.FAIL in frames
    assert (px == (255, 0, 0)).all(-1).sum() == 4 * (8 * 4) ** 2          # each red block is 32x32 after x4


def test_marks_cover_no_part_of_the_board(tmp_path):
    """The pass/fail mark sits outside the image: every pixel of every board, corners included (the
    top-right cell holds the fourth object of a "four ..." prompt), is the image's own, enlarged."""
    import numpy as np
    import grid
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 32, 32, generator=g)
    canvas = np.asarray(grid.save_grid(tmp_path / "m.png", images, 3, titles=["a", "b", "c"], marks=[True, False, True],
                                       captions=["x", "y", "z"]).convert("RGB")).astype(int)
    side = 128
    for img in images:
        tile = np.kron((img.permute(1, 2, 0).numpy() * 255).round(), np.ones((4, 4, 1))).astype(int)    # (128, 128, 3)
        ys, xs = np.nonzero((canvas[:-side + 1, :-side + 1] == tile[0, 0]).all(-1))
        assert any((canvas[y:y + side, x:x + side] == tile).all() for y, x in zip(ys, xs)), "a board was drawn over"


@pytest.mark.parametrize("argv,words", [
    (["--noise-level", "-1"], "--noise-level must be finite"),
    (["--noise-level", "nan"], "--noise-level must be finite"),
    (["--cfg", "nan"], "--cfg must be finite"),
    (["--out", "/nonexistent/dir/chain.png"], "not a writable directory"),
    (["--out", "/proc/chain.png"], "not a writable directory"),
    (["--out", "chain.txt"], "ending in .png"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, argv, words):
    import os
    import subprocess
    import sys
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(rollout.__file__), "rollout.py"), *argv],
                       capture_output=True, text=True, cwd=tmp_path)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr
    assert os.listdir(tmp_path) == []
