"""The paths a real multi-GPU run takes, checked on the CPU at tiny sizes (issue 16): mixed precision
(frozen weights in bf16, what trains in fp32, the ratio tripwire), fp16's loss scale, gradient
checkpointing, the prompt-embedding cache and the text encoders leaving the accelerator, --no-t5,
--resolution, chunked evaluation (--eval-batch), --report-to, and bench/gpu_throughput.py and
bench/memory.py's model building, so that they cannot rot without a GPU."""
import importlib.machinery
import importlib.util
import json
import os
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

import models
import ppo
import rollout
import train
from models import load_backbone
from test_train import rows, run
from tiny import make_tiny_sd15, make_tiny_sd3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
TINY = ["--batch-size", "4", "--num-steps", "3", "--eval-num-steps", "3", "--minibatch-size", "6",
        "--eval-seeds", "1", "--value-warmup", "1"]
PROMPTS = ["a red circle", "two blue squares", "a cat left of a dog"]
# The bf16 tripwire's tolerance, 10x the fp32 one (1e-5). Rollout and recompute run the same bf16 net on
# the same inputs and take its output to fp32 before the step's mean and log-prob, so they agree exactly
# when the kernels do not depend on the batch (measured here: 0); kernels that block another batch size
# differently (GPU GEMMs) change a few outputs by a rounding step, whose effect on a log-prob averaged
# over every latent element stays far below this. It sits under the smallest gap a precision mismatch
# opens on these models (a bf16 rollout recomputed by the fp32 net: 4.8e-4 on the SD3-architecture model,
# 3.6e-3 on SD1.5's, 4.8e-3 on tiny-dit), which the test asserts too: the tripwire still catches the bug
# it exists for.
BF16_TOL = 1e-4


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {"sd3.5m-arch": make_tiny_sd3(str(root / "sd3")), "sd1.5-arch": make_tiny_sd15(str(root / "sd15")),
            "sd3-t5": make_tiny_sd3(str(root / "sd3t5"), t5=True), "tiny-dit": "tiny-dit", "tiny-unet": "tiny-unet"}


# ----------------------------------------------------------------------------- mixed precision

@pytest.mark.parametrize("name", ["tiny-dit", "sd3.5m-arch", "sd1.5-arch"])
def test_bf16_recompute_gives_ratio_one_and_a_precision_mismatch_does_not(pipes, name):
    b16, b32 = load_backbone(pipes[name], dtype=torch.bfloat16), load_backbone(pipes[name])
    assert next(b16.net.parameters()).dtype == torch.bfloat16
    noise = 1.0 if b16.sampler == "ddim" else 0.7
    traj = rollout.sample(b16, PROMPTS, 4, noise, generator=torch.Generator().manual_seed(1))
    assert traj.log_probs.dtype == traj.means.dtype == torch.float32        # the step's math is fp32
    idx, j = [t.flatten() for t in torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")]
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(2))
    same, mismatch = [], []
    for mb in (perm[:5], perm[5:]):                                        # other batch sizes than the rollout's
        with torch.no_grad():
            old = traj.log_probs[idx[mb], j[mb]]
            same.append((rollout.recompute_log_prob(b16, traj, idx[mb], j[mb])[0] - old).exp().sub(1).abs().max())
            mismatch.append((rollout.recompute_log_prob(b32, traj, idx[mb], j[mb])[0] - old).exp().sub(1).abs().max())
    assert max(same) < BF16_TOL < max(mismatch), (max(same), max(mismatch))


def test_train_bf16_trains_fp32_adapters_on_a_bf16_base(tmp_path):
    """--mixed-precision bf16: the base and the reward models' inputs in bf16, the policy and critic
    adapters, the value head and AdamW's states in fp32 (diffusers' cast_training_params); the first
    update's |ratio - 1| under BF16_TOL; a full copy (--lora-rank 0) trains as an fp32 net."""
    argv = ["--mixed-precision", "bf16", "--lora-rank", "4", *TINY]
    args = train.configure(train.build_parser().parse_args([*argv, "--run-dir", str(tmp_path / "x")]), argv)[0]
    backbone = load_backbone("tiny-dit", dtype=torch.bfloat16)
    policy_net, ref_net, critic, opt_policy, opt_critic = train.build(args, backbone, 1)
    lora = {n: p.dtype for n, p in backbone.net.named_parameters() if "lora_" in n}
    base = {n: p.dtype for n, p in backbone.net.named_parameters() if "lora_" not in n}
    assert set(lora.values()) == {torch.float32} and set(base.values()) == {torch.bfloat16}
    assert {p.dtype for p in critic.head.parameters()} == {torch.float32}
    run_dir = str(tmp_path / "run")
    assert run([*argv, "--iters", "2", "--run-dir", run_dir]) == 0
    assert json.load(open(os.path.join(run_dir, "config.json")))["mixed_precision"] == "bf16"
    assert rows(run_dir)[-1]["losses/ratio_dev_first"] < BF16_TOL
    assert {v.dtype for v in load_file(os.path.join(run_dir, "checkpoint", "policy.safetensors")).values()} == {torch.float32}
    state = torch.load(os.path.join(run_dir, "checkpoint", "state.pt"), weights_only=True)
    moments = [s[k] for s in state["opt_policy"]["state"].values() for k in ("exp_avg", "exp_avg_sq")]
    assert moments and {m.dtype for m in moments} == {torch.float32}
    args.lora_rank = 0
    full = load_backbone("tiny-dit", dtype=torch.bfloat16)
    policy_net, ref_net, critic, *_ = train.build(args, full, 1)
    assert policy_net.dtype == critic.net.dtype == torch.float32 and ref_net.dtype == torch.bfloat16


def test_precision_defaults_by_device(tmp_path, capsys):
    assert models.default_precision("cuda") == "bf16" and models.default_precision("cpu") == "no"
    assert run(["--print-config", "--run-dir", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out)["mixed_precision"] == "no"
    assert run(["--mixed-precision", "fp8", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "--mixed-precision" in err


def test_fp16_loss_scale_keeps_small_gradients_and_backs_off_an_overflow():
    """A gradient of 1e-8 through fp16 activations underflows to 0 unscaled; with LossScale it arrives
    (unscaled, in the fp32 parameter's gradient); an overflow halves the scale and skips the step
    without counting it as skipped, and the weights stay as they were."""
    x = torch.full((4,), 1.0, dtype=torch.float16)

    def step(scale, factor):
        w = torch.nn.Parameter(torch.ones(4))
        opt = torch.optim.SGD([w], lr=1.0)
        if scale:
            opt.loss_scale = ppo.LossScale()
        loss = ((w.half() * x).float() * factor).sum()
        norm, skipped = ppo.optimiser_step(loss, [w], opt, max_grad_norm=1e9)
        return norm, skipped, w, opt
    assert step(False, 1e-8)[0] == 0.0                                   # lost in fp16
    norm, skipped, w, opt = step(True, 1e-8)
    assert norm == pytest.approx(2e-8, rel=1e-2) and not skipped and opt.loss_scale.value == 2.0 ** 16
    norm, skipped, w, opt = step(True, 1e3)                              # 1e3 x 65536 overflows fp16
    assert not skipped and opt.loss_scale.value == 2.0 ** 15 and opt.loss_scale.overflows == 1
    assert torch.equal(w.detach(), torch.ones(4))


# ----------------------------------------------------------------------------- gradient checkpointing

@pytest.mark.parametrize("name", ["tiny-dit", "tiny-unet"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(pipes, name, tmp_path):
    """train.build with --gradient-checkpointing: the policy's log-prob loss and its adapter's gradients
    are those without it, and checkpointing is engaged (a block runs again in backward) on the policy
    and on the critic's backbone."""
    def built(*flags):
        argv = ["--model", name, "--lora-rank", "4", "--run-dir", str(tmp_path / "run"), *flags]
        backbone = load_backbone(pipes[name])
        policy_net, _, critic, *_ = train.build(train.configure(train.build_parser().parse_args(argv), argv)[0],
                                                backbone, 1)
        # a block that gradients pass through (after the first adapted attention); checkpointing's
        # recompute calls its forward again, not the module's hooks
        block = policy_net.transformer_blocks[0] if backbone.sampler == "flow" else policy_net.down_blocks[1].resnets[0]
        calls, forward = [], block.forward
        block.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
        return backbone, policy_net, critic, calls
    backbone, policy_net, _, _ = built()
    traj = rollout.sample(backbone, PROMPTS, 3, 0.7 if backbone.sampler == "flow" else 1.0,
                          generator=torch.Generator().manual_seed(0), net=policy_net)

    def loss_and_grads(*flags):
        backbone, policy_net, critic, calls = built(*flags)
        log_prob, _, _ = rollout.recompute_log_prob(backbone, traj, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]),
                                                   net=policy_net)
        loss = (log_prob * torch.tensor([1.0, -2.0, 0.5])).sum()
        loss.backward()
        grads = {n: p.grad for n, p in policy_net.named_parameters() if p.grad is not None}
        return loss.item(), grads, len(calls), any(getattr(m, "gradient_checkpointing", False)
                                                   for m in critic.backbone_net.modules())
    plain_loss, plain, plain_calls, plain_critic = loss_and_grads()
    ckpt_loss, ckpt, ckpt_calls, ckpt_critic = loss_and_grads("--gradient-checkpointing")
    assert plain and plain.keys() == ckpt.keys()
    assert ckpt_loss == pytest.approx(plain_loss, abs=1e-6)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-8)
    assert (plain_calls, ckpt_calls, plain_critic, ckpt_critic) == (1, 2, False, True)


@pytest.mark.parametrize("name", ["tiny-dit", "sd3.5m-arch", "sd1.5-arch"])
def test_gradient_checkpointing_trains_the_critic_adapter_as_without_it(pipes, name, tmp_path):
    """The critic's LoRA adapter shares the base with the policy's; under --gradient-checkpointing the
    blocks run again during backward, and peft reads whichever adapter is active then. Three critic-only
    iterations (value warm-up) end to end: after the first, the value head's last layer is no longer
    zero, so the backbone's adapter gets gradient; its weights (and the head's) must be those of the same
    run without checkpointing. Before the fix (backward outside the critic's adapter) they were 1e-3 off."""
    def critic_after(*flags):
        run_dir = str(tmp_path / f"run{len(flags)}")
        assert run(["--model", pipes[name], "--rewards", "jpeg", "--lora-rank", "4", "--iters", "3", *TINY, "--value-warmup", "3",
                    "--run-dir", run_dir, *flags]) == 0
        return load_file(os.path.join(run_dir, "checkpoint", "critic.safetensors"))
    plain, ckpt = critic_after(), critic_after("--gradient-checkpointing")
    assert plain["head.mlp.2.weight"].abs().sum() > 0
    assert any(k.startswith("lora.") and "lora_B" in k and plain[k].abs().sum() > 0 for k in plain)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=0, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------- the prompt cache, --no-t5

def test_prompt_cache_is_the_uncached_conditioning_and_spares_the_encoders(pipes):
    b = load_backbone(pipes["sd3.5m-arch"])
    direct = b._encode(PROMPTS)                                           # no cache involved
    uncond = b._encode([""])
    calls = []
    for m in b.text_encoders():
        m.register_forward_hook(lambda *a: calls.append(1))
    cond = b.encode(PROMPTS)
    assert calls                                                          # the first time, they encode
    for k in direct:
        torch.testing.assert_close(cond.cond[k], direct[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(cond.uncond[k], uncond[k].expand_as(cond.uncond[k]), rtol=0, atol=1e-6)
    calls.clear()
    again = b.encode(list(reversed(PROMPTS)) + PROMPTS[:1])               # cached: any order, repeats
    assert not calls
    for k in direct:
        assert torch.equal(again.cond[k][0], cond.cond[k][2]) and torch.equal(again.cond[k][3], cond.cond[k][0])
    b.offload_text_encoders()                                             # off the accelerator (the CPU here)
    assert all(p.device.type == "cpu" for m in b.text_encoders() for p in m.parameters())
    new = b.encode(["two green triangles"])                               # a prompt not cached still encodes
    assert calls and new.cond["encoder_hidden_states"].device == b.device


def test_train_encodes_every_prompt_before_offloading_and_never_after(tmp_path, monkeypatch):
    events = []
    encode, offload = models.Backbone._encode, models.Backbone.offload_text_encoders
    monkeypatch.setattr(models.Backbone, "_encode", lambda self, prompts: events.append(("encode", len(prompts)))
                        or encode(self, prompts))
    monkeypatch.setattr(models.Backbone, "offload_text_encoders", lambda self: events.append(("offload",))
                        or offload(self))
    assert run(["--iters", "2", "--run-dir", str(tmp_path / "run"), *TINY]) == 0
    assert ("offload",) in events
    assert events[-1] == ("offload",), events                            # rollouts, evaluation: all from the cache


def test_no_t5_loads_sd3_without_its_t5(pipes, tmp_path, capsys):
    with_t5, without = load_backbone(pipes["sd3-t5"]), load_backbone(pipes["sd3-t5"], no_t5=True)
    assert with_t5.pipe.text_encoder_3 is not None and without.pipe.text_encoder_3 is None
    a, b = (x.encode(PROMPTS).cond["encoder_hidden_states"] for x in (with_t5, without))
    clip = 32                                                             # the tiny CLIP's tokens come first
    assert a.shape == b.shape and (b[:, clip:] == 0).all() and a[:, clip:].abs().max() > 0
    torch.testing.assert_close(a[:, :clip], b[:, :clip])
    assert run(["--no-t5", "--run-dir", str(tmp_path / "run")]) == 2        # tiny-dit has no T5 to leave out
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--no-t5" in err and "not an SD3 pipeline" in err


# ----------------------------------------------------------------------------- resolution, evaluation batches

def test_resolution_defaults_checks_and_sampling(pipes, tmp_path, capsys):
    def config(*argv):
        assert run([*argv, "--print-config", "--run-dir", str(tmp_path / "run")]) == 0
        return json.loads(capsys.readouterr().out)["resolution"]
    assert (config("--model", "sd3.5m"), config("--model", "sd1.5"), config()) == (512, 512, 32)
    assert config("--model", "sd3.5m", "--resolution", "1024") == 1024
    for argv, words in ((["--model", "sd3.5m", "--resolution", "520"], "multiple of 16"),
                        (["--model", "sd3.5m", "--resolution", "8192"], "position table reaches 6144"),
                        (["--resolution", "40"], "reaches 32"), (["--resolution", "0"], "--resolution must be >= 8")):
        assert run([*argv, "--run-dir", str(tmp_path / "run")]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    b = load_backbone(pipes["sd1.5-arch"], resolution=24)                 # native 16 px
    assert rollout.sample(b, PROMPTS[:2], 2, 1.0, generator=torch.Generator().manual_seed(0)).images.shape == (2, 3, 24, 24)
    b = load_backbone(pipes["sd3.5m-arch"], resolution=8)
    assert rollout.sample(b, PROMPTS[:2], 2, 0.7, generator=torch.Generator().manual_seed(0)).images.shape == (2, 3, 8, 8)


def test_evaluation_samples_and_scores_in_eval_batch_chunks(tmp_path, monkeypatch):
    import rewards
    sizes = {"sample": [], "score": []}
    sample = rollout.sample
    monkeypatch.setattr(rollout, "sample", lambda b, prompts, steps, noise, *a, **k: (
        sizes["sample"].append(len(prompts)) if noise == 0 else None) or sample(b, prompts, steps, noise, *a, **k))
    shapes = rewards._FACTORIES["shapes"]

    def recording(device=None, dtype=None):
        fn = shapes(device, dtype)

        def scored(images, prompts, metadata=None):
            sizes["score"].append(len(images))
            out = fn(images, prompts, metadata)
            scored.last_strict = getattr(fn, "last_strict", None)
            return out
        return scored
    monkeypatch.setitem(rewards._FACTORIES, "shapes", recording)
    run_dir = str(tmp_path / "run")
    assert run(["--iters", "1", "--eval-batch", "7", "--run-dir", run_dir, *TINY]) == 0
    # two evaluations (the base model, iteration 1) of the held-out prompts in chunks of 7, and two
    # grids of 8 prompts (7 + 1 per seed, 2 seeds); scored as sampled, besides the training batches of 4
    import toy
    sevens = len(toy.prompts("heldout")) // 7
    assert max(sizes["sample"]) == 7 and sizes["sample"].count(7) == 2 * sevens + 2 * 2
    assert max(sizes["score"]) == 7 and sizes["score"].count(7) == 2 * sevens
    assert "eval/heldout_shapes" in rows(run_dir)[-1]


def test_eval_cli_chunks_prompts(tmp_path):
    """eval.py --eval-batch 2 on 5 prompts: three sampling calls, every prompt once, in order."""
    import eval as evaluation
    import steer
    calls = []
    original = steer.steer

    def spy(backbone, prompts, *a, **k):
        calls.append(list(prompts))
        return original(backbone, prompts, *a, **k)
    steer.steer = spy
    try:
        out = str(tmp_path / "eval")
        evaluation.main(["--steer", "bon", "--select", "reward", "--n", "2", "--max-prompts", "5", "--seeds", "1",
                         "--num-steps", "3", "--eval-batch", "2", "--no-compare", "--out", out])
    finally:
        steer.steer = original
    results = json.load(open(os.path.join(out, "results.json")))["images"]
    assert [len(c) for c in calls] == [2, 2, 1] and [r["prompt"] for r in results] == sum(calls, [])
    assert results[0]["nfe"] == steer.expected_nfe("bon", 2, 3, 3, "reward")


# ----------------------------------------------------------------------------- --report-to

def test_report_to_tensorboard_writes_every_metric(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = str(tmp_path / "run")
    assert run(["--iters", "2", "--report-to", "tensorboard", "--run-dir", run_dir, *TINY]) == 0
    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    for row in rows(run_dir):
        for key in ("eval/heldout_strict", "losses/ratio_dev_first"):
            if key in row:
                assert any(e.step == row["iter"] and e.value == pytest.approx(row[key]) for e in events.Scalars(key))


def test_report_to_wandb_logs_each_row_and_needs_the_package(tmp_path, monkeypatch, capsys):
    """With a stand-in wandb module: one init per run, every numeric metric of every row logged at its
    iteration. Without the package: one line, exit 2, before any work."""
    logged, inits = [], []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: inits.append(kw) or types.SimpleNamespace(
        log=lambda d, step: logged.append((step, d)), finish=lambda: inits.append("finished"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run_dir = str(tmp_path / "run")
    assert run(["--iters", "2", "--report-to", "wandb", "--run-dir", run_dir, *TINY]) == 0
    assert len(inits) == 2 and inits[0]["config"]["report_to"] == "wandb" and inits[-1] == "finished"
    assert [step for step, _ in logged] == [r["iter"] for r in rows(run_dir)]
    for (step, data), row in zip(logged, rows(run_dir)):
        assert data == {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                        and k != "iter"}
    monkeypatch.delitem(sys.modules, "wandb")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    capsys.readouterr()
    assert run(["--report-to", "wandb", "--run-dir", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the wandb package is not installed" in err and not os.path.exists(tmp_path / "run2")


# ----------------------------------------------------------------------------- the GPU benchmarks

def test_gpu_throughput_runs_at_tiny_size(tmp_path):
    """bench/gpu_throughput.py's whole path at tiny size on the CPU (its full size needs a GPU), and its
    full-size pipelines build (on the meta device)."""
    import gpu_throughput
    out = gpu_throughput.main(["--size", "tiny", "--out", str(tmp_path / "gt.json")])
    saved = json.load(open(tmp_path / "gt.json"))
    for model in ("sd3.5m", "sd1.5"):
        r = saved["models"][model]
        assert r["iteration_s"] > 0 and r["images_per_s_rollout"] > 0 and r["ratio_dev_first"] < 1e-5
        assert r["flops_per_iteration"] > r["denoiser_flops_train"] > r["denoiser_flops_forward"] > 0
        assert r["mfu"] is None and r["per_rank"]["batch_per_rank"] == 4            # as on 8 ranks
    assert out["models"].keys() == saved["models"].keys()
    pipe = gpu_throughput.full_pipeline("sd3.5m", torch.device("meta"), str(tmp_path))
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.transformer.config.num_layers == 24


def test_memory_bench_builds_the_published_architectures():
    """bench/memory.py's configs give the published parameter counts (SD1.5's UNet 859,520,964;
    SD3.5-M's transformer 2.24 B), and its LoRA count is peft's own."""
    import memory
    sd15, sd3 = memory.components("sd1.5"), memory.components("sd3.5m")
    assert memory.count(sd15["unet"]) == 859_520_964 and memory.count(sd15["vae"]) == 83_653_863
    assert 2.24e9 < memory.count(sd3["transformer"]) < 2.25e9
    backbone = load_backbone("tiny-dit")
    from critic import lora_config
    backbone.net.add_adapter(lora_config(backbone, 4, 8), adapter_name="policy")
    peft_count = sum(p.numel() for n, p in backbone.net.named_parameters() if "lora_" in n)
    assert memory.lora_count(load_backbone("tiny-dit").net, "flow", 4) == peft_count


def gpu_check(*argv, nproc=2):
    """bench/gpu_check.sh as a user runs it; its exit code and output."""
    import subprocess
    env = {**os.environ, "PYTHON": sys.executable, "NPROC": str(nproc), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), *argv], env=env, capture_output=True,
                         text=True, timeout=900)
    return out.returncode, out.stdout + out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_check_refuses_a_machine_without_a_gpu_and_a_used_log_dir(tmp_path):
    code, text = gpu_check(str(tmp_path / "logs"))
    assert code == 2 and text.startswith("error: no CUDA GPU") and not (tmp_path / "logs").exists()
    (tmp_path / "used").mkdir(), (tmp_path / "used" / "old.log").write_text("kept")
    code, text = gpu_check("--cpu", str(tmp_path / "used"))
    assert code == 2 and "is not empty" in text and os.listdir(tmp_path / "used") == ["old.log"]


@pytest.mark.slow
def test_gpu_check_passes_every_step_on_the_cpu(tmp_path):
    """The GPU check's own steps (torchrun straight and resumed, eval with grad+bon, throughput) with
    --cpu: 1.5 minutes, so marked slow; on a CPU the resumed run's metrics equal the straight run's."""
    code, text = gpu_check("--cpu", str(tmp_path / "logs"))
    assert code == 0 and "all passed on 2 x cpu" in text, text[-3000:]
    assert "largest relative difference resumed vs straight: 0\n" in text
