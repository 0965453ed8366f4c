"""train.py end to end, at tiny sizes: 3-iteration runs of each algorithm on each built-in model
(run directory contents, first-update ratio 1), 2 iterations on random-weight SD3.5-M and SD1.5
architectures (LoRA adapters; the saved adapter, loaded with diffusers' load_lora_weights,
makes the trained policy's images),
exact resume, every bad input (one line, exit code 2, nothing written), a non-finite reward
skipping its update, 2-process torchrun runs (collectives, per-rank randomness, exact resume),
and a fast learning check (reward goes up)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import train
from tiny import make_tiny_sd15, make_tiny_sd3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch-size", "4", "--num-steps", "3", "--eval-num-steps", "3", "--minibatch-size", "6",
        "--eval-seeds", "1", "--value-warmup", "1"]


def run(argv):
    """train.main in this process (no interpreter start-up per run); the exit code."""
    try:
        return train.main(argv)
    except SystemExit as e:                       # argparse's own errors
        return e.code


def rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def real_arch(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {"sd3.5m": make_tiny_sd3(str(root / "sd3")), "sd1.5": make_tiny_sd15(str(root / "sd15"))}


@pytest.mark.parametrize("model", ["tiny-dit", "tiny-unet"])
@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_three_iterations(tmp_path, model, algo):
    run_dir = str(tmp_path / "run")
    extra = ["--group-size", "2", "--value-warmup", "0"] if algo == "grpo" else []     # no critic to warm up
    assert run(["--model", model, "--algo", algo, "--iters", "3", "--run-dir", run_dir, "--lora-rank", "0", *TINY,
                *extra]) == 0
    for f in ("config.json", "metrics.jsonl", "reward.png", "samples/iter_0000.png", "samples/iter_0003.png",
              "checkpoint/policy.safetensors", "checkpoint/state.pt", "pipeline/model_index.json"):
        assert os.path.isfile(os.path.join(run_dir, f)), f
    assert os.path.isfile(os.path.join(run_dir, "checkpoint/critic.safetensors")) == (algo == "ppo")
    log = rows(run_dir)
    assert [r["iter"] for r in log] == [0, 1, 2, 3] and log[-1]["images"] == 12
    assert "eval/heldout_strict" in log[0] and "eval/heldout_strict" in log[-1]
    updates = [r for r in log[1:] if "losses/ratio_dev_first" in r]
    assert len(updates) == (2 if algo == "ppo" else 3)             # ppo: iteration 1 is value warm-up
    assert all(r["losses/ratio_dev_first"] < 1e-5 for r in updates)  # the rollout/training tripwire
    assert all(r["losses/skipped"] == 0 for r in log[1:])
    if algo == "ppo":
        assert log[1]["warmup"] and "losses/pg_loss" not in log[1] and "losses/value_loss" in log[1]
        assert all("critic/explained_variance" in r for r in log[1:])
        import critic
        from models import load_backbone as lb
        b = lb(model)
        trained = critic.load(b, run_dir)                     # what steering loads
        saved = load_file(os.path.join(run_dir, "checkpoint/critic.safetensors"))
        assert all(torch.equal(v, trained.state_dict_to_save()[k]) for k, v in saved.items())
    # the exported pipeline is the trained policy, and it moved
    from models import load_backbone
    policy = load_file(os.path.join(run_dir, "checkpoint/policy.safetensors"))
    exported = load_backbone(os.path.join(run_dir, "pipeline")).net.state_dict()
    base = load_backbone(model).net.state_dict()
    assert all(torch.equal(policy[k], exported[k]) for k in policy)
    assert any(not torch.equal(policy[k], base[k]) for k in policy)


def test_raft_fine_tunes_on_the_kept_samples(tmp_path):
    """--algo raft: without a strict verdict (jpeg) the top quarter of each batch is kept, the
    pretraining loss is taken on it, and the exported policy moved; with the shapes checker the
    strict passes are kept (the share logged is the batch's strict pass rate)."""
    from models import load_backbone
    run_dir = str(tmp_path / "raft")
    assert run(["--algo", "raft", "--rewards", "jpeg", "--iters", "2", "--run-dir", run_dir, "--lora-rank", "0",
                "--lr", "1e-3", *TINY, "--value-warmup", "0"]) == 0
    log = rows(run_dir)
    assert all(r["losses/raft_kept"] == 0.25 and r["losses/raft_loss"] > 0 for r in log[1:])
    policy = load_backbone(os.path.join(run_dir, "pipeline")).net.state_dict()
    base = load_backbone("tiny-dit").net.state_dict()
    assert any(not torch.equal(policy[k], base[k]) for k in policy)
    run_dir = str(tmp_path / "raft-shapes")
    assert run(["--algo", "raft", "--iters", "1", "--run-dir", run_dir, "--lora-rank", "0", *TINY, "--value-warmup", "0"]) == 0
    row = rows(run_dir)[-1]
    assert row["losses/raft_kept"] == row["reward/train/strict"]


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch, capsys):
    """A policy that turns non-finite is refused at the save: one line, exit 2, no checkpoint and
    no export written, and an earlier good checkpoint stays as it was."""
    run_dir = str(tmp_path / "run")
    assert run(["--iters", "2", "--save-every", "1", "--run-dir", run_dir, "--lora-rank", "0", *TINY]) == 0
    before = load_file(os.path.join(run_dir, "checkpoint", "policy.safetensors"))
    good = checkpoint.policy_state

    def poisoned(args, net):
        state = dict(good(args, net))
        key = next(iter(state))
        state[key] = torch.full_like(state[key], float("nan"))
        return state
    monkeypatch.setattr(checkpoint, "policy_state", poisoned)
    capsys.readouterr()
    assert run(["--resume", run_dir, "--iters", "3"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]       # besides the progress bar
    assert len(lines) == 1 and "NaN or inf" in lines[0] and "not saved" in lines[0] and "Traceback" not in err
    after = load_file(os.path.join(run_dir, "checkpoint", "policy.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sde_window_trains_only_its_steps(tmp_path):
    """--sde-steps 2 of 4: only the 2 noisiest steps are stochastic and trained. The critic is
    scored on those states alone (their noise buckets), the ratio tripwire holds, and the pairs
    per update are images x 2 (8 pairs: one minibatch of 8 must divide them, 6 would not)."""
    run_dir = str(tmp_path / "run")
    common = ["--num-steps", "4", "--eval-num-steps", "4", "--batch-size", "4", "--eval-seeds", "1", "--value-warmup", "1"]
    assert run([*common, "--sde-steps", "2", "--minibatch-size", "6", "--run-dir", run_dir]) == 2
    assert run([*common, "--sde-steps", "2", "--minibatch-size", "8", "--iters", "2", "--run-dir", run_dir]) == 0
    log = rows(run_dir)
    assert log[-1]["losses/ratio_dev_first"] < 1e-5
    buckets = {k for r in log[1:] for k in r if k.startswith("critic/ev_noise_")}
    assert buckets == {"critic/ev_noise_1.0-0.8", "critic/ev_noise_0.8-0.6"}, buckets   # sigma 1.0 and 0.67 only


def test_critic_terminal_teaches_the_head_the_state_after_the_window(tmp_path, monkeypatch):
    """--critic-terminal with a window of 2 of 4 steps: the value head's data holds F = 3 states per
    trajectory, and the third, the last state x_(t_1), has the fixed return as its target: the reward,
    which with gae-lambda < 1 equals the target of the window's last step (A = r - V there) and no
    other; the critic reads x_(t_1) (step 3), not x_(t_S) (step 2, the first after the window)."""
    import critic
    import ppo
    from models import load_backbone
    seen, update, timesteps, features = [], ppo.update, set(), critic.Critic.features

    def spy(*a, features=None, **kw):
        seen.append(features)
        return update(*a, features=features, **kw)

    def spy_features(self, backbone, x_t, t, cond, proxy=None):
        timesteps.update(t.tolist())
        return features(self, backbone, x_t, t, cond, proxy)
    monkeypatch.setattr(ppo, "update", spy)
    monkeypatch.setattr(critic.Critic, "features", spy_features)
    run_dir = str(tmp_path / "run")
    assert run(["--num-steps", "4", "--eval-num-steps", "4", "--batch-size", "4", "--eval-seeds", "1",
                "--value-warmup", "1", "--sde-steps", "2", "--minibatch-size", "8", "--iters", "2",
                "--gae-lambda", "0.5", "--critic-terminal", "--no-critic-text", "--critic-replay", "1",
                "--run-dir", run_dir]) == 0
    tokens, temb, returns, old = seen[-1]
    assert len(tokens) == len(returns) == 4 * 3                       # B x (S + 1): no replay
    t = load_backbone("tiny-dit").schedule(4).timesteps.tolist()
    assert timesteps == {t[0], t[1], t[3]}, (timesteps, t)
    G = returns.view(4, 3, -1)
    torch.testing.assert_close(G[:, 2], G[:, 1])                      # x_(t_1): the reward, as the last step's
    assert not torch.allclose(G[:, 0], G[:, 2])                       # lambda 0.5 bootstraps the first
    assert all("critic/ev_terminal" in r for r in rows(run_dir)[1:])


def test_critic_text_trains_a_head_on_the_prompt_tokens(tmp_path, monkeypatch):
    """--critic-text: the value head's data carries each state's text tokens, its projection trains,
    and the run's critic loads back with the text head (steering reads it: critic.load)."""
    import critic
    import ppo
    from models import load_backbone
    seen, initial, update = [], [], ppo.update

    def spy(*a, features=None, **kw):
        if not initial:                                   # the projection before its first update
            initial.append(a[7].head.text_proj.weight.detach().clone())
        seen.append(features)
        return update(*a, features=features, **kw)
    monkeypatch.setattr(ppo, "update", spy)
    run_dir = str(tmp_path / "run")
    assert run([*TINY, "--iters", "2", "--critic-text", "--critic-replay", "1", "--run-dir", run_dir]) == 0
    tokens, temb, text, returns, old = seen[-1]
    assert len(text) == len(returns) == 4 * 3 and text.dim() == 3
    trained = critic.load(load_backbone("tiny-dit"), run_dir)
    assert trained.text and not torch.equal(trained.head.text_proj.weight, initial[0])


@pytest.mark.parametrize("states", ["all", "last"])
def test_critic_replay_states(tmp_path, monkeypatch, states):
    """--critic-replay-states: the value head's data is this batch's every state and, from the earlier
    kept batches, every state (all) or their x_(t_1) alone (last), row for row as those batches had them."""
    import ppo
    seen, update = [], ppo.update

    def spy(*a, features=None, **kw):
        seen.append(features)
        return update(*a, features=features, **kw)
    monkeypatch.setattr(ppo, "update", spy)
    kept, save = [], checkpoint.save_checkpoint          # the replay as train.py holds it, at each checkpoint

    def save_spy(*a, **kw):
        kept.append(list(a[-1]))                        # replay: its last argument
        return save(*a, **kw)
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_spy)
    B, F = 4, 3                                                           # --sde-steps 2: 2 window states + x_(t_1)
    assert run(["--num-steps", "4", "--eval-num-steps", "4", "--batch-size", str(B), "--eval-seeds", "1",
                "--sde-steps", "2", "--minibatch-size", "8", "--iters", "3", "--value-warmup", "0",
                "--critic-terminal", "--no-critic-text", "--critic-replay", "3", "--critic-replay-states", states,
                "--run-dir", str(tmp_path / "run")]) == 0
    first, last = seen[0], seen[-1]                                       # iterations 1 and 3: (tokens, temb, returns, old)
    assert all(len(t) == B * F for t in first)
    if states == "all":
        assert all(len(t) == 3 * B * F for t in last)
        assert all(torch.equal(a[:B * F], b) for a, b in zip(last, first))
    else:
        assert all(len(t) == 2 * B + B * F for t in last)
        assert all(torch.equal(a[:B], b[F - 1::F]) for a, b in zip(last, first))   # iteration 1's x_(t_1) rows
    # what is kept (and checkpointed) of each batch is what later iterations replay of it, and no more
    # is held: an earlier batch's tensors own only its kept rows (a strided view would hold them all)
    assert len(kept[-1]) == 3
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for entry in kept[-1] for t in entry)
    assert all(len(t) == (B * F if states == "all" else B) for entry in kept[-1] for t in entry)
    path = os.path.join(str(tmp_path / "run"), "checkpoint", "replay_rank0.safetensors")
    saved = load_file(path)
    assert {len(t) for t in saved.values()} == {B * F if states == "all" else B}
    # bench/critic_health.py reads either layout of the kept batches: every state, or x_(t_1) alone
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from critic_health import health
    oldest = health(str(tmp_path / "run"), 32, 0)["replay_oldest4"]
    assert len(oldest) == F and oldest[F - 1] is not None
    assert all((s is None) == (states == "last") for s in oldest[:F - 1])
    if states == "last":   # a checkpoint written when every row was kept resumes to the same replay
        full = {k: torch.zeros(B * F, *t.shape[1:], dtype=t.dtype) for k, t in saved.items()}
        for k, t in saved.items():
            full[k][F - 1::F] = t                       # rows b*F + F - 1: x_(t_1); the others must not be read
        save_file(full, path)
        assert run(["--resume", str(tmp_path / "run"), "--iters", "4"]) == 0
        assert all(len(t) == 2 * B + B * F for t in seen[-1])
        assert all(torch.equal(a[:2 * B], torch.cat([b[B:2 * B], b[2 * B:][F - 1::F]]))    # iterations 2 and 3
                   for a, b in zip(seen[-1], last))


@pytest.mark.parametrize("arch", ["sd3.5m", "sd1.5"])
def test_real_architectures_with_lora(tmp_path, real_arch, arch):
    run_dir = str(tmp_path / "run")
    # a large learning rate, so the policy moves far enough from the base for a wrongly scaled adapter to show
    argv = ["--model", real_arch[arch], "--rewards", "jpeg", "--lora-rank", "4", *TINY, "--lr", "1e-2"]
    assert run([*argv, "--iters", "2", "--run-dir", run_dir]) == 0
    log = rows(run_dir)
    assert all(r["losses/ratio_dev_first"] < 1e-5 for r in log[2:])
    assert "eval/heldout_jpeg" in log[-1] and "eval/heldout_strict" not in log[-1]
    # the exported adapter is the trained policy: a fresh diffusers pipeline with load_lora_weights
    # makes the trained policy's images (same seed, same steps), not those of the adapter at another
    # strength (alpha is 2 x rank here: an export without the adapter's config loads at half strength)
    from critic import POLICY, adapter
    from models import load_backbone

    def images(pipe):
        return pipe(["a red circle", "two squares"], num_inference_steps=3, guidance_scale=1.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images                  # (2, 3, H, W)

    ours = load_backbone(real_arch[arch])
    train_args = train.configure(train.build_parser().parse_args([*argv, "--run-dir", str(tmp_path / "x")]), argv)[0]
    policy_net, *_ = train.build(train_args, ours, 1)
    checkpoint.load_policy_state(train_args, policy_net, load_file(os.path.join(run_dir, "checkpoint/policy.safetensors")))
    with adapter(policy_net, POLICY):
        trained = images(ours.pipe)
    pipe = load_backbone(real_arch[arch]).pipe
    base = images(pipe)
    pipe.load_lora_weights(os.path.join(run_dir, "policy_lora"))
    exported = images(pipe)
    assert (trained - base).abs().max() > 1e-3                  # it trained, visibly
    assert (exported - trained).abs().max() < 1e-5, ((exported - trained).abs().max(), (trained - base).abs().max())


@pytest.mark.parametrize("replay, how", [([], "--resume"), (["--critic-replay", "3", "--critic-text"], "same command"),
                                         (["--critic-replay", "3", "--critic-proxy-input"], "--resume"),
                                         (["--critic", "oracle", "--oracle-continuations", "2", "--value-warmup", "0"],
                                          "--resume")])
def test_resume_is_exact(tmp_path, capsys, monkeypatch, replay, how):
    """2 iterations, then --resume to 4 (or the same command with --iters 4, as a requeued job or
    torchrun --max-restarts reruns it) == 4 iterations straight: same metrics, same weights. At a
    constant learning rate: extending a run stretches the default cosine over the new --iters. With
    --critic-replay the value head's kept states must come back too, with --critic-text their text tokens
    as well, with --critic-proxy-input their proxies (else iteration 3's head trains on one batch instead
    of three, and the critic differs); the
    oracle critic's continuations draw from the rollout's noise stream, which a resume restores. Every
    checkpoint file is loaded onto the CPU (map_location), never onto the device it was saved from."""
    common = ["--iters", "4", *TINY, "--eval-every", "2", "--lr-schedule", "constant", *replay]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert run([*common, "--run-dir", straight]) == 0
    assert run([*common, "--run-dir", resumed, "--iters", "2"]) == 0
    loads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("map_location")) or load(*a, **k))
    if how == "--resume":
        assert run(["--resume", resumed, "--iters", "4"]) == 0
    else:
        assert run([*common, "--run-dir", resumed]) == 0 and "resumed from iteration 2" in capsys.readouterr().out
        assert run([*common, "--run-dir", resumed]) == 2                  # done: nothing to do, nothing touched
        assert "already at iteration 4" in capsys.readouterr().err
    assert loads and set(loads) == {"cpu"}, loads
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}
    a, b = rows(straight), rows(resumed)
    assert [drop(r) for r in a] == [drop(r) for r in b]
    files = ("policy", "critic") if "oracle" not in replay else ("policy",)
    for f in files:
        x, y = (load_file(os.path.join(d, "checkpoint", f"{f}.safetensors")) for d in (straight, resumed))
        assert all(torch.equal(x[k], y[k]) for k in x)
    if "oracle" in replay:          # the oracle trains no critic and saves none
        assert not os.path.exists(os.path.join(straight, "checkpoint", "critic.safetensors"))
        assert a[-1]["critic/continuation_images"] == 2 * 4 * 3


def test_the_policy_learning_rate_decays_as_a_cosine_over_the_run(tmp_path):
    """The built-in world's default schedule: lr x (1 + cos(pi it / iters)) / 2 at iteration it,
    a function of the iteration alone (so a resumed run with the same --iters continues it exactly)."""
    run_dir = str(tmp_path / "run")
    assert run(["--iters", "4", *TINY, "--lr", "2e-3", "--run-dir", run_dir]) == 0
    lrs = [r["lr/policy"] for r in rows(run_dir)[1:]]
    assert lrs == pytest.approx([2e-3 * 0.5 * (1 + math.cos(math.pi * it / 4)) for it in range(4)])


@pytest.mark.parametrize("argv, words", [
    (["--algo", "dqn"], "unknown algorithm"),
    (["--model", "sd9"], "unknown model"),
    (["--rewards", "beauty"], "unknown reward"),
    (["--rewards", "shapes,jpeg", "--reward-weights", "1"], "1 values for 2 rewards"),
    (["--algo", "grpo", "--batch-size", "6", "--group-size", "4"], "not divisible"),
    (["--batch-size", "4", "--minibatch-size", "7"], "--minibatch-size 7"),
    (["--iters", "0"], "--iters must be >= 1"),
    (["--num-steps", "4", "--sde-steps", "6"], "--sde-steps 6 exceeds --num-steps 4"),
    (["--num-steps", "4", "--sde-steps", "4", "--critic-terminal"], "--critic-terminal needs"),
    (["--algo", "grpo", "--sde-steps", "2", "--critic-terminal"], "--critic-terminal: only --algo ppo --critic learned"),
    (["--algo", "grpo", "--group-size", "2", "--critic-text"], "--critic-text: only --algo ppo --critic learned"),
    (["--critic", "none", "--critic-terminal", "--sde-steps", "2"], "--critic-terminal: only --algo ppo --critic learned"),
    (["--critic", "oracle", "--value-warmup", "2"], "--value-warmup 2: only --algo ppo --critic learned"),
    (["--critic", "proxy", "--critic-replay", "4"], "--critic-replay 4: only --algo ppo --critic learned"),
    (["--algo", "grpo", "--critic-adaln", "off"], "--critic-adaln off: only --algo ppo --critic learned"),
    (["--algo", "grpo", "--critic", "none"], "--critic none: --algo grpo uses no critic"),
    (["--algo", "raft", "--adv-norm", "step"], "--adv-norm step: --algo raft makes its advantages without it"),
    (["--critic", "proxy-fit", "--critic-terminal", "--sde-steps", "2"], "--critic-terminal: only --algo ppo --critic learned"),
    (["--critic", "oracle", "--oracle-continuations", "0"], "--oracle-continuations must be >= 1"),
    (["--critic", "proxy-fit", "--critic-proxy-input"], "--critic-proxy-input: only --algo ppo --critic learned"),
    (["--critic-replay-states", "last", "--no-critic-terminal"], "--critic-replay-states last needs --critic-terminal"),
    (["--critic", "value"], "--critic: invalid choice"),
    (["--resume", "/nonexistent/run"], "no run to resume"),
    (["--train-tags", "counting,spelling"], "no training prompt has the tag 'spelling'"),
    (["--lr", "inf"], "--lr must be finite and > 0"),
    (["--clip-range", "nan"], "--clip-range must be finite and > 0"),
    (["--noise-level", "-1"], "--noise-level must be finite and >= 0"),
    (["--noise-level", "nan"], "--noise-level must be finite and >= 0"),
    (["--cfg", "nan"], "--cfg must be finite"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, words):
    run_dir = str(tmp_path / "run")
    assert run(["--run-dir", run_dir, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and words in err, err
    assert not os.path.exists(run_dir)


def test_train_tags_narrow_the_training_prompts_not_the_heldout(tmp_path):
    def prompts(*argv):
        argv = ["--run-dir", str(tmp_path / "run"), *argv]
        return train.configure(train.build_parser().parse_args(argv), argv)[2:]
    train_all, heldout_all = prompts()
    train_some, heldout_some = prompts("--train-tags", "counting,colors")
    assert train_some == [m for m in train_all if m["tag"] in ("counting", "colors")]
    assert {m["tag"] for m in train_some} == {"counting", "colors"} and len(train_some) < len(train_all)
    assert heldout_some == heldout_all


def test_run_dir_is_never_overwritten(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"algo": "grpo"}))
    assert run(["--run-dir", str(run_dir)]) == 2
    assert "holds a different run" in capsys.readouterr().err
    (run_dir / "config.json").unlink()
    (run_dir / "notes.txt").write_text("mine")
    assert run(["--run-dir", str(run_dir)]) == 2
    assert "not empty" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert run(["--run-dir", str(tmp_path / "file" / "run")]) == 2
    assert "not a writable directory" in capsys.readouterr().err
    assert sorted(os.listdir(run_dir)) == ["notes.txt"]


def test_the_same_command_re_exports_a_finished_run_and_names_a_world_size_change(tmp_path, monkeypatch, capsys):
    """A finished run whose export was lost (the process died after the last checkpoint) is exported again
    by its own command, with nothing retrained; the same command on another number of processes is
    refused in words that say so (not as 'a different run')."""
    run_dir = str(tmp_path / "run")
    argv = ["--iters", "2", *TINY, "--run-dir", run_dir]
    assert run(argv) == 0
    before = rows(run_dir)
    import shutil
    for d in ("pipeline", "policy_lora"):
        shutil.rmtree(os.path.join(run_dir, d))
    assert run(argv) == 0 and rows(run_dir) == before
    assert os.path.isfile(os.path.join(run_dir, "pipeline", "model_index.json"))
    assert run(argv) == 2 and "already at iteration 2" in capsys.readouterr().err
    # a run made before a flag existed (its config lacks the key): the same command says so and names
    # --resume, which takes the run's config and continues it
    config = json.load(open(os.path.join(run_dir, "config.json")))
    del config["critic_proxy_input"]
    open(os.path.join(run_dir, "config.json"), "w").write(json.dumps(config))
    assert run([*argv[:1], "3", *argv[2:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "older than --critic-proxy-input" in err and f"--resume {run_dir}" in err, err
    assert run(["--resume", run_dir, "--iters", "3"]) == 0 and len(rows(run_dir)) == len(before) + 1
    capsys.readouterr()
    monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("RANK", "0")         # torchrun's rank 0 of 2
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained on 1 process(es), not 2" in err, err


def test_nonfinite_reward_skips_the_update(tmp_path, monkeypatch):
    import toy
    check = toy.check
    monkeypatch.setattr(toy, "check", lambda images, metas: (check(images, metas)[0], torch.full((len(images),), float("nan"))))
    run_dir = str(tmp_path / "run")
    assert run(["--iters", "2", "--run-dir", run_dir, "--lora-rank", "0", *TINY]) == 0   # a full copy: every weight
    log = rows(run_dir)
    assert all("returned nan" in r["skipped"] for r in log[1:])
    from models import load_backbone
    base = load_backbone("tiny-dit").net.state_dict()
    policy = load_file(os.path.join(run_dir, "checkpoint/policy.safetensors"))
    assert all(torch.equal(policy[k], base[k]) for k in policy)


def torchrun(argv, spy_dir, cwd=ROOT, **env):
    """train.py on 2 processes (gloo on CPU), watched by tests/spy_train.py; each rank's draws."""
    os.makedirs(spy_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "spy_train.py"), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SPY_DIR": spy_dir, **env}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [[json.loads(line) for line in open(os.path.join(spy_dir, f"rank{r}.jsonl"))] for r in range(2)]


def test_torchrun_two_processes(tmp_path, capsys):
    """The DDP path end to end (gloo on CPU): two ranks, one shared run directory. Every tensor
    collective goes through ppo.collective (spy_train.py raises otherwise); the ranks draw different
    prompts and noise, before and after a resume; 2 + 2 iterations resumed == 4 straight, per rank's
    draws and in every metric; resuming on another number of processes is refused.
    The straight run has no --run-dir, so it is named by the time, and rank 1's clock reads 5 s late
    (as ranks on either side of a second, or nodes' clocks, read): both ranks still write rank 0's run.
    The held-out evaluation is split over the ranks (21 prompts x 2 seeds in chunks of 8, 8 and 5: 6
    units, 3 each) and gives one process's figures."""
    # a constant lr: extending a run with --resume --iters stretches a cosine over the new length
    common = ["--iters", "4", *TINY, "--batch-size", "4", "--minibatch-size", "6", "--save-every", "2",
              "--eval-every", "2", "--lr-schedule", "constant", "--eval-seeds", "2", "--eval-batch", "8"]
    a = torchrun(common, str(tmp_path / "spy_straight"), cwd=str(tmp_path), SPY_CLOCK_SKEW="5")
    assert len(os.listdir(tmp_path / "runs")) == 1, os.listdir(tmp_path / "runs")
    straight, resumed = str(tmp_path / "runs" / os.listdir(tmp_path / "runs")[0]), str(tmp_path / "resumed")
    # rank 1 sampled its half of each evaluation (the base model's, iteration 2's and 4's), no more
    sampled = [len(json.loads(line)["prompts"]) for line in open(tmp_path / "spy_straight" / "rank1_eval.jsonl")]
    assert sampled == [8, 8, 5] * 3, sampled
    import toy
    from models import load_backbone
    strict, score = toy.evaluate(load_backbone("tiny-dit", "cpu"), train.load_prompts("shapes", 0)[1], seeds=(0, 1),
                                 num_steps=3)                   # one process, the base model
    assert rows(straight)[0]["eval/heldout_strict"] == pytest.approx(strict, abs=1e-6)
    assert rows(straight)[0]["eval/heldout_score"] == pytest.approx(score, abs=1e-6)
    torchrun([*common, "--iters", "2", "--run-dir", resumed], str(tmp_path / "spy_resumed"))
    for r, d in ((r, d) for r in range(2) for d in (straight, resumed)):
        assert os.path.isfile(os.path.join(d, "checkpoint", f"rng_rank{r}.pt"))
    b = torchrun(["--resume", resumed, "--iters", "4"], str(tmp_path / "spy_resumed"))
    assert len(a[0]) == len(a[1]) == len(b[0]) == len(b[1]) == 4          # one training rollout per iteration
    for it in range(4):               # (the global torch RNG too: train.build seeds every rank alike, then not)
        assert a[0][it]["prompts"] != a[1][it]["prompts"] and a[0][it]["noise"] != a[1][it]["noise"], it
        assert a[0][it]["torch_rng"] != a[1][it]["torch_rng"], it
    assert a == b                                  # each rank resumed its own streams
    log = rows(straight)
    assert [r["iter"] for r in log] == [0, 1, 2, 3, 4] and log[-1]["images"] == 16
    assert log[-1]["losses/ratio_dev_first"] < 1e-5
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}
    assert [drop(r) for r in log] == [drop(r) for r in rows(resumed)]
    # one process cannot continue the two ranks' streams
    assert run(["--resume", resumed, "--iters", "6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "2 process(es), not 1" in err, err


def test_reward_goes_up(tmp_path, monkeypatch):
    """The loop learns, in half a minute of CPU: with a dense reward (how red the image is) the
    held-out reward rises under critic-PPO, and with the opposite reward it falls. The second run
    guards against a pass by drift: a perturbed policy makes busier images whatever the reward
    (a JPEG-size test passes both ways on the shipped base), and a sign error would pass too."""
    import rewards

    def redness(sign):
        def factory(device=None, dtype=None):
            return lambda images, prompts, metadata=None: sign * 10 * (images[:, 0] - images[:, 1:].mean(1)).mean((1, 2))
        return factory

    final = {}
    for sign in (1.0, -1.0):
        monkeypatch.setitem(rewards._FACTORIES, "shapes", redness(sign))   # in place of the checker
        run_dir = str(tmp_path / f"run{sign}")
        assert run(["--iters", "8", "--batch-size", "16", "--num-steps", "4", "--eval-num-steps", "4",
                    "--minibatch-size", "32", "--value-warmup", "1", "--eval-every", "8", "--eval-seeds", "1",
                    "--lr", "1e-3", "--lora-rank", "0", "--sde-steps", "4", "--run-dir", run_dir]) == 0
        log = rows(run_dir)
        base, final[sign] = sign * log[0]["eval/heldout_shapes"], sign * log[-1]["eval/heldout_shapes"]
    assert final[1.0] > base + 0.01 and final[-1.0] < base - 0.01, (base, final)


def test_real_model_configuration_is_valid(tmp_path):
    """--model sd3.5m --rewards hps,clip passes every check (its run needs a GPU and downloads)."""
    argv = ["--model", "sd3.5m", "--rewards", "hps,clip", "--reward-weights", "1,1", "--prompts", "geneval",
            "--run-dir", str(tmp_path / "run")]
    args, spec, train_prompts, heldout = train.configure(train.build_parser().parse_args(argv), argv)
    assert spec.names == ["hps", "clip"] and args.lora_rank == 32 and args.lora_alpha == 64
    assert args.algo == "ppo" and args.group_size == 1 and args.noise_level == 0.7
    assert len(train_prompts) > len(heldout) > 0 and not os.path.exists(tmp_path / "run")


def test_print_config_resolves_the_defaults_by_model(tmp_path, capsys):
    """--print-config prints the resolved configuration as JSON (no weights loaded, nothing written):
    SD models get the paper's and peers' defaults, the built-in world keeps its own."""
    def config(*argv):
        assert run([*argv, "--print-config", "--run-dir", str(tmp_path / "run")]) == 0
        return json.loads(capsys.readouterr().out)
    sd3, sd15, tiny = config("--model", "sd3.5m"), config("--model", "sd1.5"), config()
    for c in (sd3, sd15):
        assert (c["prompts"], c["clip_range"], c["lr"], c["lora_rank"], c["lora_alpha"], c["eval_num_steps"]) == \
            ("geneval", 1e-4, 3e-4, 32, 64, 40)
    assert sd3["num_steps"] == sd3["sde_steps"] == 10 and sd15["num_steps"] == sd15["sde_steps"] == 50
    assert (tiny["prompts"], tiny["clip_range"], tiny["lr"], tiny["lora_rank"], tiny["lora_alpha"], tiny["num_steps"],
            tiny["sde_steps"], tiny["eval_num_steps"]) == ("shapes", 1e-2, 1e-3, 16, 32, 10, 5, 10)
    assert (sd3["lr_schedule"], sd15["lr_schedule"], tiny["lr_schedule"]) == ("constant", "constant", "cosine")
    given = config("--model", "sd1.5", "--num-steps", "20", "--lr", "1e-5")      # a typed flag still wins
    assert (given["num_steps"], given["lr"]) == (20, 1e-5)
    assert not os.path.exists(tmp_path / "run")
    # each model-dependent default names its source in --help
    text = " ".join(train.build_parser().format_help().split())
    for words in ("the paper's 10 on SD3.5-M and DDPO's 50 on SD1.5", "40 for SD models, the paper's",
                  "3e-4 for SD models, the peers'", "1e-4 for SD models, the peers'", "geneval for SD models"):
        assert words in text, words


def test_lora_on_a_builtin_model(tmp_path):
    """--lora-rank > 0 works on the built-in pipelines too (which have no diffusers LoRA loader:
    the adapter is saved as plain safetensors, and merged into pipeline/)."""
    run_dir = str(tmp_path / "run")
    assert run(["--iters", "2", "--run-dir", run_dir, "--lora-rank", "4", *TINY]) == 0
    assert os.path.isfile(os.path.join(run_dir, "policy_lora", "adapter.safetensors"))
    assert rows(run_dir)[-1]["losses/ratio_dev_first"] < 1e-5
    # pipeline/ holds the policy with its adapter merged: it samples what the adapter did
    import rollout
    from critic import POLICY, adapter
    from models import load_backbone
    trained, base = load_backbone(os.path.join(run_dir, "pipeline")), load_backbone("tiny-dit")
    assert not any("lora" in k for k in trained.net.state_dict())
    train_args, spec, _, _ = train.configure(train.build_parser().parse_args(["--lora-rank", "4", *TINY]),
                                             ["--lora-rank", "4", *TINY])
    policy_net, *_ = train.build(train_args, base, 1)
    checkpoint.load_policy_state(train_args, policy_net, load_file(os.path.join(run_dir, "checkpoint", "policy.safetensors")))
    g = lambda: torch.Generator().manual_seed(0)
    with adapter(policy_net, POLICY) as net:
        ours = rollout.sample(base, ["two red circles"], 3, 0.0, generator=g(), net=net).images
    theirs = rollout.sample(trained, ["two red circles"], 3, 0.0, generator=g()).images
    plain = rollout.sample(load_backbone("tiny-dit"), ["two red circles"], 3, 0.0, generator=g()).images
    assert (ours - theirs).abs().max() < 1e-4 and (ours - plain).abs().max() > 1e-6
