"""Input hardening across the entry points (cli.py's shared checks): a table of bad inputs, each run
as its own process, must get exit code 2, exactly one line on stderr, no traceback, and leave every
file as it was (nothing created, nothing changed); and runs cut off must not be dead ends: one killed
before its first checkpoint starts again, one stopped by SIGTERM saves a checkpoint, says how to
resume and resumes to completion, and a diverging run (--lr inf past the checks) stops without
writing a non-finite tensor.

Run: HF_HUB_OFFLINE=1 python -m pytest -q tests/test_inputs.py"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train
from test_train import TINY, rows, run
from tiny import make_tiny_sd3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DIT = os.path.join(ROOT, "checkpoints", "tiny-dit")
TRANSFORMER = os.path.join("transformer", "diffusion_pytorch_model.safetensors")
# one thread per process: the checks are cheap, and the machines that run this are often busy
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def python(script, *argv, cwd, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=cwd, capture_output=True,
                          text=True, env=env or ENV, timeout=300)


def snapshot(root):
    """Every directory under root, and every file with its size and modification time (a directory's
    own mtime moves when cli.unwritable probes it with a temporary file, which it removes)."""
    out = {}
    for d, dirs, files in os.walk(root):
        out.update({os.path.relpath(os.path.join(d, name), root): None for name in dirs})
        for name in files:
            st = os.stat(os.path.join(d, name))
            out[os.path.relpath(os.path.join(d, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def broken(world, name, source, rel, data):
    """A copy of the pipeline or run `source` as world/name, with file `rel` replaced by `data`."""
    shutil.copytree(source, os.path.join(world, name))
    with open(os.path.join(world, name, rel), "wb") as f:
        f.write(data)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The inputs: damaged copies of the shipped pipeline, a binary 'prompt list', a finished 2-iteration
    run and damaged copies of it, a random-weight SD3.5-M-architecture pipeline. Each table row runs in
    this directory, so whatever a row writes (default run directories included) lands in it."""
    world = str(tmp_path_factory.mktemp("world"))
    weights = open(os.path.join(TINY_DIT, TRANSFORMER), "rb").read()
    broken(world, "truncated", TINY_DIT, TRANSFORMER, weights[:len(weights) // 2])
    broken(world, "garbage", TINY_DIT, TRANSFORMER, os.urandom(4096))
    unet = open(os.path.join(ROOT, "checkpoints", "tiny-unet", "unet", "diffusion_pytorch_model.safetensors"), "rb")
    broken(world, "unet-in-transformer", TINY_DIT, TRANSFORMER, unet.read())
    broken(world, "bad-index", TINY_DIT, "model_index.json", b'{"_class_name": "ShapesPipeline", ')
    with open(os.path.join(world, "binary.txt"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    r = python("train.py", "--iters", "2", *TINY, "--run-dir", "run", cwd=world)
    assert r.returncode == 0, r.stderr[-2000:]
    policy = open(os.path.join(world, "run", "checkpoint", "policy.safetensors"), "rb").read()
    broken(world, "run-truncated", os.path.join(world, "run"), "checkpoint/policy.safetensors", policy[:len(policy) // 2])
    broken(world, "run-bad-critic", os.path.join(world, "run"), "checkpoint/critic.safetensors", b"\0" * 100)
    make_tiny_sd3(os.path.join(world, "sd3"))
    os.makedirs(os.path.join(world, "adir.png"))
    return world


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="--device cuda is valid here")
BAD = [
    # train.py: models, runs, files, devices, numbers
    ("train.py", ["--model", "truncated"], "diffusion_pytorch_model.safetensors: not a loadable safetensors file"),
    ("train.py", ["--model", "garbage"], "not a loadable safetensors file"),
    ("train.py", ["--model", "unet-in-transformer"], "weights are not a SD3Transformer2DModel's"),
    ("train.py", ["--model", "bad-index"], "model_index.json: not a readable JSON file"),
    ("train.py", ["--resume", "run-truncated"], "checkpoint/policy.safetensors: not a loadable safetensors file"),
    ("train.py", ["--resume", "run", "--iters", "1"], "already at iteration 2, past --iters 1"),
    ("train.py", ["--resume", "run"], "already at iteration 2, its last --iters 2"),
    ("train.py", ["--run-dir", "/proc/run_x"], "/proc is not a writable directory"),
    ("train.py", ["--prompts", "binary.txt"], "--prompts binary.txt: not a UTF-8 text file"),
    ("train.py", ["--rewards", "hps"], "pass --reward-path hps=PATH"),
    pytest.param("train.py", ["--device", "cuda"], "no CUDA GPU is visible", marks=NO_GPU),
    ("train.py", ["--device", "tpu9"], "--device must be a torch device (accepted: cpu, cuda, cuda:N, mps), got 'tpu9'"),
    ("train.py", ["--lr", "inf"], "--lr must be finite and > 0, got inf"),
    ("train.py", ["--noise-level", "-1"], "--noise-level must be finite and >= 0 and <= 1, got -1"),
    ("train.py", ["--noise-level", "nan"], "--noise-level must be finite and >= 0 and <= 1, got nan"),
    ("train.py", ["--gamma", "2"], "--gamma must be finite and > 0 and <= 1, got 2"),
    # toy.py, pretrain.py
    ("toy.py", ["eval", "--seeds", "0"], "--seeds must be >= 1, got 0"),
    ("toy.py", ["eval", "--steps", "0"], "--steps must be >= 1, got 0"),
    ("pretrain.py", ["--batch", "0"], "--batch must be >= 2, got 0"),
    ("pretrain.py", ["--init", "truncated", "--out", "pretrained"], "not a loadable safetensors file"),
    # rollout.py
    ("rollout.py", ["--out", "missing/chain.png"], "is not a writable directory"),
    ("rollout.py", ["--out", "/proc/chain.png"], "/proc is not a writable directory"),
    ("rollout.py", ["--out", "chain.txt"], "must be a file ending in .png"),
    ("rollout.py", ["--noise-level", "-1"], "--noise-level must be finite and >= 0 and <= 1, got -1"),
    ("rollout.py", ["--noise-level", "nan"], "--noise-level must be finite and >= 0 and <= 1, got nan"),
    ("rollout.py", ["--cfg", "nan"], "--cfg must be finite and >= 1, got nan"),
    ("rollout.py", ["--model", "unet-in-transformer"], "weights are not a SD3Transformer2DModel's"),
    # critic.py
    ("critic.py", ["--batch", "0"], "--batch must be >= 1, got 0"),
    ("critic.py", ["--minibatch", "0"], "--minibatch must be >= 1, got 0"),
    ("critic.py", ["--iters", "0"], "--iters must be >= 1, got 0"),
    ("critic.py", ["--eval-batches", "0"], "--eval-batches must be >= 1, got 0"),
    ("critic.py", ["--model", "sd3"], "critic.py fits on the built-in world only"),
    # eval.py
    ("eval.py", ["--model", "truncated"], "not a loadable safetensors file"),
    ("eval.py", ["--prompts", "binary.txt"], "--prompts binary.txt: not a UTF-8 text file"),
    ("eval.py", ["--rewards", "hps"], "pass --reward-path hps=PATH"),
    ("eval.py", ["--device", "tpu9"], "--device must be a torch device"),
    ("eval.py", ["--noise-level", "nan"], "--noise-level must be finite and >= 0 and <= 1, got nan"),
    ("eval.py", ["--out", "/proc/eval"], "/proc is not a writable directory"),
    ("eval.py", ["--steer", "bon", "--critic", "run-bad-critic"], "critic.safetensors: not a loadable safetensors file"),
    # what a newcomer tripped on: each at its root, for every entry point that takes the flag
    ("rollout.py", ["--out", "adir.png"], "a directory of that name exists"),
    ("pretrain.py", ["--model", "tiny-dit", "--init", os.path.join(ROOT, "checkpoints", "tiny-unet"), "--out", "p"],
     "holds no transformer, so it is not a --model tiny-dit pipeline"),
    ("train.py", ["--seed", "-1"], "--seed must be >= 0 and <= 2147483647, got -1"),
    ("rollout.py", ["--seed", "-1"], "--seed must be >= 0"),
    ("critic.py", ["--seed", "-1"], "--seed must be >= 0"),
    ("pretrain.py", ["--seed", "-1"], "--seed must be >= 0"),
    ("eval.py", ["--sde-steps", "20", "--num-steps", "10"], "--sde-steps 20 exceeds --num-steps 10"),
    ("train.py", ["--prompts", "geneval"], "the built-in world's checker knows circle, square, triangle"),
    ("eval.py", ["--prompts", "geneval"], "the built-in world's checker knows circle, square, triangle"),
    ("train.py", ["--model", "sd3", "--rewards", "shapes"], "reward 'shapes' judges the built-in world's 32 px boards"),
    ("train.py", ["--model", "sd3", "--rewards", "toy-pref"], "reward 'toy-pref' judges the built-in world's 32 px"),
    ("train.py", ["--rewards", "toy-clip", "--reward-path", "toy-clip=run"], "not a pretrain.py --model toy-clip"),
    ("train.py", ["--rewards", "shapes,jpeg", "--reward-weights", "0,0"], "every weight is 0"),
    ("train.py", ["--model", "tiny-unet", "--noise-level", "5"], "--noise-level must be finite and >= 0 and <= 1, got 5"),
    ("eval.py", ["--noise-level", "1.5"], "--noise-level must be finite and >= 0 and <= 1"),
    ("rollout.py", ["--noise-level", "2"], "--noise-level must be finite and >= 0 and <= 1"),
    ("train.py", ["--cfg", "-3"], "--cfg must be finite and >= 1, got -3"),
    ("rollout.py", ["--cfg", "0.5"], "--cfg must be finite and >= 1, got 0.5"),
    ("train.py", ["--run-dir", ""], "--run-dir must not be empty"),
    ("train.py", ["--resume", ""], "--resume must not be empty"),
    ("eval.py", ["--out", ""], "--out must not be empty"),
    ("eval.py", ["--policy", ""], "--policy must not be empty"),
    ("pretrain.py", ["--out", ""], "--out must not be empty"),
    ("train.py", ["--mixed-precision", "fp16"], "--mixed-precision fp16 needs a GPU"),
    ("eval.py", ["--mixed-precision", "fp16"], "--mixed-precision fp16 needs a GPU"),
    ("rollout.py", ["--mixed-precision", "fp16"], "--mixed-precision fp16 needs a GPU"),
    ("train.py", ["--threads", "0"], "--threads must be >= 1, got 0"),
    ("train.py", ["--critic", "oracle", "--oracle-continuations", "0"], "--oracle-continuations must be >= 1"),
    # bench/critic_fit.py, bench/steering.py, bench/critic_health.py, bench/value_ceiling.py, bench/credit.py,
    # bench/reward_hacking.py, bench/learned_rewards.py
    ("bench/critic_fit.py", ["--sde-steps", "10"], "--sde-steps must be in 1..9"),
    ("bench/steering.py", ["--run", "no-such-run", "--guidance", "1,nan"], "--guidance must be finite and >= 0, got nan"),
    ("bench/critic_health.py", ["--runs", "no-such-run"], "not a finished run (no pipeline/): no-such-run"),
    ("bench/value_ceiling.py", ["--windows", "10:5", "5:6"], "--windows 5:6: expected K:S"),
    ("bench/value_ceiling.py", ["--windows", "6:3", "--append", "--prompts", "4"], "--append needs"),
    ("bench/credit.py", ["--tag", "a/b"], "--tag 'a/b': letters, digits and '-' only"),
    ("bench/reward_hacking.py", ["--steer-clip-weights", "1", "nan"], "--steer-clip-weights must be finite and >= 0, got nan"),
    ("bench/reward_hacking.py", ["--taste", "-1"], "--taste is a finite weight >= 0 of the learned suite, got -1"),
    ("bench/learned_rewards.py", ["--also", "mild=no-such-dir"], "--also 'mild=no-such-dir': expected LABEL=DIR"),
]


def row_id(row):
    script, argv = (row.values if hasattr(row, "values") else row)[:2]
    return f"{script} {' '.join(argv)}"


def test_world_size_without_torchrun_is_one_line_and_writes_nothing(world):
    """WORLD_SIZE=2 without torchrun's RANK: refused before the run directory exists."""
    before = snapshot(world)
    r = python("train.py", "--run-dir", "ws", cwd=world, env={**ENV, "WORLD_SIZE": "2"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "start a multi-process run with torchrun" in r.stderr, r.stderr
    assert snapshot(world) == before


@pytest.mark.parametrize("script, argv, words", BAD, ids=[row_id(row) for row in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(world, script, argv, words):
    before = snapshot(world)
    # an empty hub cache: hps's weights are not there, and the hub is offline
    r = python(script, *argv, cwd=world, env={**ENV, "HF_HOME": os.path.join(world, "hf-home")})
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith("error: ") and words in lines[0], lines[0]
    assert snapshot(world) == before


@pytest.fixture
def one_thread():
    """In-process runs: one thread, as the subprocesses (a busy 2-core machine slows 2 threads 50-fold)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tensors_in(x):
    """Every tensor in a nest of dicts, lists and tuples (an optimiser's state_dict)."""
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    return [t for v in x for t in tensors_in(v)] if isinstance(x, (list, tuple)) else []


def wait_for(path, process, timeout=240):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, f"no {path} after {timeout}s"
        time.sleep(0.02)


def test_killed_runs_start_again_or_resume(tmp_path):
    """A run killed (SIGKILL) before its first checkpoint is rerun by the same command; SIGTERM after
    its first checkpoint (saved after iteration 1) ends it with a checkpoint, exit 143 and one line
    saying how to resume; --resume then finishes it: every iteration logged once, the policy exported."""
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--iters", "16", *TINY, "--run-dir", run_dir]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(os.path.join(run_dir, "config.json"), p)
    p.kill(), p.communicate()
    assert not os.path.exists(os.path.join(run_dir, "checkpoint"))
    p = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(os.path.join(run_dir, "checkpoint", "state.pt"), p)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=300)[1]
    said = [line for line in err.splitlines() if "SIGTERM" in line]
    assert p.returncode == 143 and len(said) == 1 and f"python train.py --resume {run_dir}" in said[0], err[-3000:]
    done = torch.load(os.path.join(run_dir, "checkpoint", "state.pt"), weights_only=True)["iteration"]
    assert 1 <= done < 16 and [r["iter"] for r in rows(run_dir)] == list(range(done + 1))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--resume", run_dir], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"resumed from iteration {done}" in r.stdout, r.stderr[-3000:]
    assert [r["iter"] for r in rows(run_dir)] == list(range(17))
    assert os.path.isfile(os.path.join(run_dir, "pipeline", "model_index.json"))


def test_a_stop_during_evaluation_ends_it_and_saves(tmp_path, monkeypatch, one_thread):
    """SIGTERM while the held-out evaluation runs (torchrun SIGKILLs its workers --shutdown-timeout
    seconds after forwarding it, 30 s by default; an SD3.5-M evaluation takes minutes): the evaluation
    stops at its next unit, that iteration logs no held-out figures, and the checkpoint is written at
    once (exit 143); --resume then finishes the run."""
    import rollout
    run_dir, sampled, sample = str(tmp_path / "run"), [], rollout.sample

    def signalled(backbone, prompts, num_steps, noise_level, *a, **k):
        since = sampled[::-1].index(0.7) if 0.7 in sampled else 0          # deterministic samples since a rollout
        if not noise_level and not train.STOP and sampled.count(0.7) == 2 and since == 2:   # iteration 2's evaluation
            train.on_signal(signal.SIGTERM, None)
        sampled.append(noise_level)
        return sample(backbone, prompts, num_steps, noise_level, *a, **k)
    monkeypatch.setattr(rollout, "sample", signalled)
    argv = ["--iters", "4", *TINY, "--eval-every", "2", "--eval-batch", "4", "--sample-every", "100", "--run-dir", run_dir]
    assert run(argv) == 143
    evaluations = [r for r in rows(run_dir) if "eval/heldout_strict" in r]
    assert [r["iter"] for r in rows(run_dir)] == [0, 1, 2] and [r["iter"] for r in evaluations] == [0]
    units = -(-21 // 4)                                        # 21 held-out prompts in chunks of 4, one seed: 6
    # the base model's evaluation (6), its grid (8 prompts x 2 seeds in chunks of 4: 4), then 3 of the second
    # evaluation's 6 units: the signal came while its third was being sampled, and the next one was not
    assert sampled.count(0.0) == units + 4 + 3
    assert torch.load(os.path.join(run_dir, "checkpoint", "state.pt"), weights_only=True)["iteration"] == 2
    monkeypatch.undo()
    assert run(["--resume", run_dir]) == 0 and [r["iter"] for r in rows(run_dir)] == [0, 1, 2, 3, 4]


def test_a_run_that_failed_at_start_up_resumes_from_scratch(tmp_path, monkeypatch, one_thread):
    """A run directory left by a failure after it was created (here: the model fails to load) holds
    config.json and no checkpoint: --resume starts it from its config, to completion."""
    import models

    def fails(*args, **kwargs):
        raise models.BackboneError("cannot load 'tiny-dit': out of memory")
    run_dir = str(tmp_path / "run")
    monkeypatch.setattr(models, "load_backbone", fails)
    assert run(["--iters", "2", *TINY, "--run-dir", run_dir]) == 2
    assert sorted(os.listdir(run_dir)) == ["config.json", "samples"]
    monkeypatch.undo()
    assert run(["--resume", run_dir]) == 0
    assert [r["iter"] for r in rows(run_dir)] == [0, 1, 2]
    assert torch.load(os.path.join(run_dir, "checkpoint", "state.pt"), weights_only=True)["iteration"] == 2


def test_lr_inf_leaves_no_non_finite_tensor_on_disk(tmp_path, capsys, one_thread):
    """--lr inf is refused on the command line (nothing written) and in a hand-edited config.json; past
    both (set on the parsed flags), the policy turns NaN at its first update, the next updates are
    skipped, and after 3 skipped in a row the run stops naming the learning rate, without saving:
    every tensor on disk stays finite, the checkpoint of iteration 1 stands."""
    run_dir = str(tmp_path / "run")
    assert run(["--lr", "inf", "--run-dir", run_dir]) == 2 and not os.path.exists(run_dir)
    argv = ["--iters", "8", *TINY, "--run-dir", run_dir]
    args, spec, train_prompts, heldout = train.configure(train.build_parser().parse_args(argv), argv)
    args.lr = float("inf")
    with pytest.raises(train.NonFiniteError, match="skipped 3 times in a row") as e:
        train.train(args, spec, train_prompts, heldout)
    assert "learning rate is probably too high (--lr inf" in str(e.value)
    ckpt = os.path.join(run_dir, "checkpoint")
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)
    assert state["iteration"] == 1 and not os.path.exists(os.path.join(run_dir, "pipeline"))
    tensors = [*load_file(os.path.join(ckpt, "policy.safetensors")).values(),
               *load_file(os.path.join(ckpt, "critic.safetensors")).values(), *tensors_in(state)]
    assert len(tensors) > 10 and all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    # the run's own config.json, edited by hand to lr inf: --resume refuses it
    config = json.load(open(os.path.join(run_dir, "config.json")))
    json.dump({**config, "lr": float("inf")}, open(os.path.join(run_dir, "config.json"), "w"))
    capsys.readouterr()
    assert run(["--resume", run_dir]) == 2
    assert "--lr must be finite and > 0, got inf" in capsys.readouterr().err


def test_ctrl_c_before_training_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the flags are checked and the reward models load (before the run's own signal
    handling starts) prints one line, exits 130 and leaves no run directory."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "configure", interrupted)
    run_dir = tmp_path / "run"
    assert run(["--run-dir", str(run_dir)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted before training started; nothing was written" and not run_dir.exists()
