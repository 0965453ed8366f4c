"""steer.py and eval.py: SMC, best-of-N and critic-gradient guidance do what METHOD.md section 7
says, their NFE accounting matches a hand count, and eval.py runs every method end to end on the
tiny real architectures and refuses bad input in one line."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import steer
from models import load_backbone
from tiny import make_tiny_sd15, make_tiny_sd3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle", "two blue squares"]
K, S = 4, 3


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {"flow": make_tiny_sd3(str(root / "sd3")), "ddim": make_tiny_sd15(str(root / "sd15"))}


@pytest.fixture(scope="module")
def backbones(dirs):
    return {k: load_backbone(v) for k, v in dirs.items()}


def run(b, method, seed=0, **kw):
    kw = {"n": 4, "num_steps": K, "noise_level": 0.7 if b.sampler == "flow" else 1.0, "sde_steps": S, **kw}
    return steer.steer(b, PROMPTS, method, generator=torch.Generator().manual_seed(seed), **kw)


def constant(x, j, idx):
    return torch.zeros(len(x))


@pytest.mark.parametrize("sampler", ["flow", "ddim"])
def test_smc_with_a_constant_critic_never_resamples_and_is_independent_sampling(backbones, sampler):
    b = backbones[sampler]
    smc, bon = run(b, "smc", value=constant), run(b, "bon", value=constant)
    torch.testing.assert_close(smc.candidates, bon.candidates, atol=0, rtol=0)
    assert (smc.scores == 0).all()                         # uniform weights throughout


def test_smc_resamples_towards_high_values(backbones):
    """With a critic that strongly prefers each prompt's first particle at window state 1, SMC
    resamples there, so from then on every particle descends from it (the states the critic sees
    at step 2 are N copies of one); best-of-N keeps N distinct states."""
    b = backbones["flow"]
    seen = {}

    def favour_first(x, j, idx):
        seen[j] = x.view(len(PROMPTS), 4, -1).clone()
        return (torch.arange(len(x)) % 4 == 0).float() * 100.0 if j == 1 else torch.zeros(len(x))
    run(b, "smc", value=favour_first, lam=1.0)
    assert (seen[1] - seen[1][:, :1]).abs().amax() > 1e-3        # before resampling: distinct
    assert (seen[2] - seen[2][:, :1]).abs().amax() < 1e-6        # after: one lineage per prompt
    seen.clear()
    run(b, "bon", value=favour_first)
    assert (seen[2] - seen[2][:, :1]).abs().amax() > 1e-3


def test_systematic_resampling_has_the_right_expectation():
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    log_w = w.log()[None].expand(20000, -1)
    anc = steer.systematic_resample(log_w, g)                              # (draws, N)
    counts = torch.stack([(anc == i).sum(-1) for i in range(5)], -1).float()   # (draws, N)
    torch.testing.assert_close(counts.mean(0), 5 * w, atol=0.02, rtol=0)
    assert ((counts - (5 * w).floor()) >= 0).all() and ((counts - (5 * w).ceil()) <= 0).all()   # low variance
    assert steer.ess(torch.zeros(1, 8)).item() == pytest.approx(8.0)
    assert steer.ess(torch.tensor([[0.0, -1e9, -1e9]])).item() == pytest.approx(1.0)


@pytest.mark.parametrize("sampler", ["flow", "ddim"])
def test_guidance_with_a_zero_gradient_critic_is_unguided_sampling(backbones, sampler):
    b = backbones[sampler]
    guided = run(b, "grad", value=lambda x, j, idx: 0.0 * x.sum((1, 2, 3)), guidance=5.0)
    plain = run(b, "none")
    torch.testing.assert_close(guided.latents, plain.latents, atol=0, rtol=0)


@pytest.mark.parametrize("sampler", ["flow", "ddim"])
def test_guidance_moves_samples_toward_an_analytic_critic_target(backbones, sampler):
    b = backbones[sampler]
    target = torch.full(b.latent_shape, 0.5)
    value = lambda x, j, idx: -((x - target) ** 2).sum((1, 2, 3))
    dist = lambda out: ((out.latents - target) ** 2).mean().item()
    plain, guided = run(b, "none"), run(b, "grad", value=value, guidance=0.2)
    assert dist(guided) < 0.8 * dist(plain)


def test_best_of_n_picks_the_argmax(backbones):
    b = backbones["flow"]
    brightness = lambda images, idx: images.mean((1, 2, 3))
    out = run(b, "bon", score=brightness, select="reward")
    assert torch.equal(out.chosen, out.scores.argmax(-1))
    torch.testing.assert_close(out.scores, out.candidates.mean((2, 3, 4)), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.images, out.candidates[torch.arange(2), out.chosen], atol=0, rtol=0)


@pytest.mark.parametrize("method", steer.METHODS)
@pytest.mark.parametrize("select", ["critic", "reward"])
@pytest.mark.parametrize("terminal", [False, True])
def test_nfe_accounting_matches_a_hand_count(backbones, method, select, terminal):
    b = backbones["flow"]
    calls = {"value": 0, "score": 0}

    def value(x, j, idx):
        calls["value"] += len(x)
        return torch.zeros(len(x)) + x.sum((1, 2, 3)) * 0
    def score(images, idx):
        calls["score"] += len(images)
        return torch.zeros(len(images))
    out = run(b, method, value=value, score=score, select=select, terminal=terminal)
    expected = steer.expected_nfe(method, 4, K, S, select, terminal)
    assert out.nfe == pytest.approx({k: float(v) for k, v in expected.items()})
    assert calls["value"] / len(PROMPTS) == expected["critic_forward"]     # each forward pass counted once
    assert calls["score"] / len(PROMPTS) == expected["reward"]


@pytest.mark.parametrize("method", ["bon", "smc"])
def test_terminal_critic_chooses_at_the_first_state_after_the_window(backbones, method):
    """terminal=True: the choice reads V(x_(t_1)), the last state (step index K - 1, after the window).
    A critic that, there alone, prefers each prompt's particle with the largest latent sum: best-of-N
    calls it there only and picks that particle; SMC weights x_(t_1) too (after the window states), so
    it resamples every particle to that one (without terminal it never would: V = 0 before)."""
    b = backbones["flow"]
    steps, states = [], {}

    def value(x, j, idx):
        steps.append(j)
        states[j] = x.clone()
        return x.sum((1, 2, 3)) * 100.0 if j == K - 1 else torch.zeros(len(x))
    out = run(b, method, value=value, terminal=True, lam=1.0, sde_steps=2)     # x_(t_1) is not x_S
    best = states[K - 1].sum((1, 2, 3)).view(len(PROMPTS), 4).argmax(-1)            # (P,)
    if method == "bon":
        assert steps == [K - 1] and torch.equal(out.chosen, best)
    else:
        assert steps == [0, 1, K - 1]
        assert (out.candidates - out.candidates[:, :1]).abs().amax() == 0           # all copies of the best
        assert (run(b, method, value=value, lam=1.0, sde_steps=2).candidates - out.candidates[:, :1]).abs().amax() > 0


def test_methods_that_need_a_critic_refuse_to_run_without_one(backbones):
    for method in ("smc", "grad", "grad+bon"):
        with pytest.raises(ValueError):
            run(backbones["flow"], method)


# ----------------------------------------------------------------------------- eval.py end to end

def cli(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *argv], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def critic_run(dirs, tmp_path_factory):
    """One critic-PPO iteration on the tiny SD3 architecture: a run with a critic checkpoint."""
    run_dir = str(tmp_path_factory.mktemp("runs") / "ppo")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--model", dirs["flow"], "--rewards", "jpeg",
                        "--prompts", "geneval", "--iters", "1", "--batch-size", "4", "--num-steps", "3", "--sde-steps", "2",
                        "--minibatch-size", "8", "--eval-num-steps", "2", "--eval-seeds", "1", "--value-warmup", "1",
                        "--lora-rank", "4", "--run-dir", run_dir], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("method", ["none", "bon", "smc", "grad+bon", "proxy-smc"])
def test_eval_writes_results_summary_and_grid(dirs, critic_run, tmp_path, method):
    out = tmp_path / "eval"
    r = cli("--model", dirs["flow"], "--critic", critic_run, "--steer", method, "--n", "2", "--prompts", "geneval",
            "--max-prompts", "3", "--seeds", "2", "--rewards", "jpeg", "--select", "reward" if method == "bon" else "critic",
            "--steer-weights", "jpeg=1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.load(open(out / "results.json"))["images"]
    assert len(rows) == 3 * 2 and all("jpeg" in row and "nfe" in row for row in rows)
    n = 1 if method == "none" else 2
    assert rows[0]["nfe"]["denoiser"] == n * 3                 # the critic run's 3 steps, N samples
    summary = json.load(open(out / "summary.json"))
    assert summary["jpeg"]["images"] == 6 and summary["jpeg"]["se"] > 0
    assert (out / "grid.png").stat().st_size > 0
    assert len(os.listdir(out / "geneval")) == 3 and (out / "geneval" / "00000" / "samples" / "0001.png").exists()
    assert "jpeg:" in r.stdout and "evaluate_images.py " + str(out / "geneval") in r.stdout   # the official scorer
    # what was evaluated is named, and a steered figure comes with the unsteered one beside it
    select = "reward" if method == "bon" else "critic"
    reads = steer.needs_critic(method, select)
    assert (f"critic: {critic_run} (--critic)" if reads else "critic: none") in r.stdout
    assert "policy: the base model" in r.stdout
    assert ("unsteered (--steer none" in r.stdout) == (method != "none")
    assert ("unsteered" in summary) == (method != "none")


def test_eval_chooses_at_the_last_state_when_the_critic_learned_it(dirs, critic_run, tmp_path):
    """A critic run made with --critic-terminal (its config says so): eval.py's SMC then also weights
    the last state, N (S + 1) critic passes per image (the run's window: 2 of 3 steps), not N S."""
    import shutil
    run = tmp_path / "terminal"
    shutil.copytree(critic_run, run)
    config = json.load(open(run / "config.json"))
    assert not config["critic_terminal"]
    json.dump({**config, "critic_terminal": True}, open(run / "config.json", "w"))
    for critic, passes in ((critic_run, 2 * 2), (str(run), 2 * 3)):
        out = tmp_path / f"eval-{passes}"
        r = cli("--model", dirs["flow"], "--critic", critic, "--steer", "smc", "--n", "2", "--prompts", "geneval",
                "--max-prompts", "2", "--seeds", "1", "--rewards", "jpeg", "--out", str(out))
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.load(open(out / "results.json"))["images"][0]["nfe"]["critic_forward"] == passes


def test_eval_on_the_sd15_architecture_without_a_critic(dirs, tmp_path):
    out = tmp_path / "eval"
    r = cli("--model", dirs["ddim"], "--steer", "bon", "--select", "reward", "--n", "2", "--prompts", "geneval",
            "--max-prompts", "2", "--seeds", "1", "--rewards", "jpeg", "--num-steps", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(json.load(open(out / "results.json"))["images"]) == 2


def test_a_killed_evaluation_leaves_no_out_and_is_redone(dirs, tmp_path):
    """Killed midway, an evaluation leaves OUT.partial (marked as its own), never a half-written OUT;
    the same command then redoes it. A .partial that is not an evaluation's is never removed."""
    out = tmp_path / "eval"
    stale = tmp_path / "eval.partial"
    stale.mkdir()
    (stale / "results.json").write_text("{half")
    argv = ("--model", dirs["ddim"], "--steer", "none", "--prompts", "geneval", "--max-prompts", "2", "--seeds", "1",
            "--rewards", "jpeg", "--num-steps", "2", "--out", str(out))
    r = cli(*argv)                                          # not marked as an evaluation's: refused, kept
    assert r.returncode == 2 and "eval.partial exists" in r.stderr and (stale / "results.json").read_text() == "{half"
    (stale / ".eval-in-progress").touch()                   # what a killed evaluation leaves
    r = cli(*argv)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not stale.exists() and len(json.load(open(out / "results.json"))["images"]) == 2
    assert not (out / ".eval-in-progress").exists()


@pytest.mark.parametrize("argv,words", [
    (["--steer", "smc", "--critic", "/nonexistent"], "not a train.py run"),
    (["--n", "0"], "--n must be >= 1, got 0"),
    (["--seeds", "-1"], "--seeds must be >= 1, got -1"),
    (["--guidance", "nan"], "--guidance must be finite and >= 0, got nan"),
    (["--policy", "/tmp"], "not a train.py run"),
    (["--prompts", "nonexistent.txt"], "--prompts"),
    (["--rewards", "nope"], "unknown reward"),
    (["--steer", "nope"], "invalid choice"),
])
def test_eval_bad_input_is_one_line_and_exit_2(tmp_path, argv, words):
    r = cli(*argv, "--out", str(tmp_path / "out"), cwd=str(tmp_path))
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert words in r.stderr and "Traceback" not in r.stderr and not (tmp_path / "out").exists(), r.stderr
    assert len(lines) == 1, r.stderr


def test_eval_without_any_critic_says_what_to_pass(tmp_path):
    r = cli("--steer", "bon", "--out", str(tmp_path / "out"), cwd=str(tmp_path))       # no runs/ here
    assert r.returncode == 2 and "--critic RUN_DIR" in r.stderr and "--select reward" in r.stderr


def test_python_train_then_eval_steer_bon_steers_with_that_runs_critic(tmp_path):
    """The design card's two commands on the built-in world, with train.py's defaults but for size: the run's
    critic is the kind `eval.py --steer bon` reads (the head learned x_(t_1), whose return is fixed, and reads
    the prompt's text tokens), and eval.py, given no flags, takes that run's policy and critic, says so, chooses
    at x_(t_1) and prints the unsteered figure beside the steered one."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--iters", "2", "--batch-size", "4",
                        "--minibatch-size", "20", "--eval-seeds", "1", "--run-dir", os.path.join("runs", "first")],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.load(open(tmp_path / "runs" / "first" / "config.json"))
    assert config["critic_terminal"] and config["critic_text"] and config["critic_replay"] == 32
    assert config["critic_replay_states"] == "last"
    r = cli("--steer", "bon", "--max-prompts", "2", "--seeds", "1", "--out", str(tmp_path / "eval"), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    run = os.path.join("runs", "first")
    assert f"policy: {run} (its final policy; the newest run under runs/" in r.stdout
    assert f"critic: {run} (the --policy run's own)" in r.stdout and "the critic chooses at x_(t_1)" in r.stdout
    assert "unsteered (--steer none, same policy, seeds and sampler)" in r.stdout


def test_eval_never_steers_with_a_critic_that_reads_the_proxy(tmp_path):
    """A run trained with --critic-proxy-input: its critic needs x0_hat and the reward at every state, which
    steering does not give it. eval.py passes over it when it picks a critic itself, and refuses it by name,
    in one line, before any model is loaded."""
    run = tmp_path / "runs" / "ppo-proxy"
    (run / "checkpoint").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": "tiny-dit", "rewards": "shapes", "critic": "learned",
                                                 "critic_proxy_input": True}))
    save_file({"head.query": torch.zeros(1)}, str(run / "checkpoint" / "critic.safetensors"))
    r = cli("--steer", "bon", "--out", str(tmp_path / "out"), cwd=str(tmp_path))
    assert r.returncode == 2 and "--critic RUN_DIR" in r.stderr, r.stderr          # not picked
    r = cli("--steer", "bon", "--critic", str(run), "--out", str(tmp_path / "out"), cwd=str(tmp_path))
    assert r.returncode == 2 and "--critic-proxy-input" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
