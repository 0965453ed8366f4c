"""models.py: every backbone kind loads through the same from_pretrained path and exposes the
interface the method needs; bad names and directories get one clear error."""
import json
import os
import subprocess
import sys

import pytest
import torch

from models import BackboneError, load_backbone
from tiny import make_tiny_sd15, make_tiny_sd3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {"sd3": make_tiny_sd3(str(root / "sd3")), "sd15": make_tiny_sd15(str(root / "sd15"))}


@pytest.mark.parametrize("name,sampler,image_side", [("tiny-dit", "flow", 32), ("tiny-unet", "ddim", 32),
                                                     ("sd3", "flow", 16), ("sd15", "ddim", 16)])
def test_interface(dirs, name, sampler, image_side):
    b = load_backbone(dirs.get(name, name))
    assert b.sampler == sampler
    prompts = ["two red circles", "a square left of a triangle"]
    cond = b.encode(prompts)
    assert len(cond) == 2 and cond.cond.keys() == cond.uncond.keys()
    # the unconditional branch is the empty prompt, the same for every row
    for v in cond.uncond.values():
        torch.testing.assert_close(v[0], v[1])
    x = torch.randn(2, *b.latent_shape, generator=torch.Generator().manual_seed(0))
    t = b.schedule(4).timesteps[:2]
    pred = b.predict(x, t, cond)
    assert pred.shape == x.shape and pred.dtype == torch.float32
    # CFG: scale 1 is the conditional prediction, scale 0 the unconditional one
    uncond_only = type(cond)(cond.uncond, cond.uncond)
    torch.testing.assert_close(b.predict(x, t, cond, cfg_scale=0.0), b.predict(x, t, uncond_only), atol=1e-5, rtol=0)
    assert (b.predict(x, t, cond, cfg_scale=1.0) - b.predict(x, t, uncond_only)).abs().max() > 1e-4
    tokens, temb = b.features(x, t, cond)
    assert tokens.dim() == 3 and tokens.shape[0] == 2 and temb.shape[0] == 2
    images = b.decode(x)
    assert images.shape == (2, 3, image_side, image_side) and 0 <= images.min() and images.max() <= 1
    sched = b.schedule(6)
    assert sched.timesteps.shape == (6,) and sched.levels.shape == (7,)


def test_schedules_come_from_the_checkpoint_scheduler(dirs):
    sd3 = load_backbone(dirs["sd3"])
    s = sd3.pipe.scheduler
    s.set_timesteps(7)
    torch.testing.assert_close(sd3.schedule(7).levels, s.sigmas.float())
    sd15 = load_backbone(dirs["sd15"])
    sched = sd15.schedule(10)
    abar = sd15.pipe.scheduler.alphas_cumprod
    torch.testing.assert_close(sched.levels[:-1], abar[sched.timesteps].float())
    assert sched.levels[-1] == abar[0]          # set_alpha_to_one=False: final alpha-bar is abar_0


@pytest.mark.parametrize("bad,needle", [("sdxl", "unknown model"), ("/no/such/dir", "no such directory")])
def test_bad_names_get_one_clear_error(bad, needle):
    with pytest.raises(BackboneError, match=needle) as e:
        load_backbone(bad)
    assert "tiny-dit" in str(e.value) and "\n" not in str(e.value)


def test_wrong_kind_of_checkpoint(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(BackboneError, match="FluxPipeline"):
        load_backbone(str(tmp_path))
    os.remove(tmp_path / "model_index.json")
    with pytest.raises(BackboneError, match="model_index.json"):
        load_backbone(str(tmp_path))


def test_hub_name_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="cannot load 'sd3.5m'"):
        load_backbone("sd3.5m")


def test_cli_bad_model_exits_2_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "rollout.py"), "--model", "nope",
                        "--out", str(tmp_path / "x.png")], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr and "unknown model" in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_fp32_matmuls_are_tf32_on_cuda_only_under_low_precision(monkeypatch):
    """On CUDA, bf16 / fp16 weights let the fp32 adapters' GEMMs run in TF32, --mixed-precision no keeps
    them exact; on the CPU nothing is touched."""
    import models
    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        assert models.fp32_matmuls("cpu", torch.bfloat16) is None
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == before
        assert models.fp32_matmuls("cuda:0", torch.bfloat16) == "tf32" == torch.backends.cuda.matmul.fp32_precision
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        assert models.fp32_matmuls("cuda", torch.float32) == "ieee" == torch.backends.cuda.matmul.fp32_precision
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before
