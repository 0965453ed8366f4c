"""critic.py: V_phi is exactly 0 at initialisation on every backbone (full copy and LoRA), its
backbone starts as the pretrained one, the LoRA adapters share one base without touching
each other, and the explained-variance diagnostics (METHOD.md section 3)."""
import pytest
import torch

import critic as critic_module
import rollout
from critic import CRITIC, POLICY, Critic, adapter, adapter_params, explained_variance, \
    explained_variance_by_noise, fit, lora_config
from models import load_backbone
from tiny import make_tiny_sd15, make_tiny_sd3

PROMPTS = ["a red circle", "two blue squares", "a cat left of a dog"]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """Loaders, not backbones: LoRA adapters change backbone.net, so every test loads its own."""
    root = tmp_path_factory.mktemp("pipes")
    paths = {"sd3.5m-arch": make_tiny_sd3(str(root / "sd3")), "sd1.5-arch": make_tiny_sd15(str(root / "sd15")),
             "tiny-dit": "tiny-dit", "tiny-unet": "tiny-unet"}
    return {name: (lambda path=path: load_backbone(path)) for name, path in paths.items()}


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("name", ["sd3.5m-arch", "sd1.5-arch", "tiny-dit", "tiny-unet"])
def test_value_is_zero_at_init(backbones, name, lora):
    b = backbones[name]()
    traj = rollout.sample(b, PROMPTS, 3, rollout.TRAIN_NOISE[b.sampler], generator=torch.Generator().manual_seed(0))
    critic = Critic(b, num_rewards=2, lora=lora, rank=4, alpha=8)
    values = critic.values(b, traj)
    assert values.shape == (3, 3, 2)
    assert torch.equal(values, torch.zeros_like(values))
    # and its gradient is not zero: the zero-initialised last layer learns at once
    v = critic(b, traj.latents[:, 1], traj.timesteps[[1, 1, 1]], traj.cond)
    v.sum().backward()
    assert critic.head.mlp[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["sd3.5m-arch", "sd1.5-arch", "tiny-dit", "tiny-unet"])
def test_text_head_reads_the_prompt_tokens(backbones, name):
    """text=True (train.py --critic-text): the head's inputs carry the denoiser's text tokens, V_phi is
    still 0 at initialisation, the value changes with the text tokens alone (same image tokens), and
    the projection learns; a checkpoint with the text head loads back through critic.load."""
    b = backbones[name]()
    traj = rollout.sample(b, PROMPTS, 3, rollout.TRAIN_NOISE[b.sampler], generator=torch.Generator().manual_seed(0))
    critic = Critic(b, num_rewards=2, lora=True, rank=4, alpha=8, text=True)
    assert torch.equal(critic.values(b, traj), torch.zeros(3, 3, 2))
    x, t = traj.latents[:, 1], traj.timesteps[[1, 1, 1]]
    tokens, temb, text = critic.features(b, x, t, traj.cond)
    torch.testing.assert_close(text, traj.cond.cond["encoder_hidden_states"].float(), rtol=0, atol=0)
    with torch.no_grad():
        critic.head.mlp[-1].weight.normal_()
    other = text.roll(1, dims=0)                                   # another prompt's tokens, same image tokens
    assert not torch.allclose(critic.head(tokens, temb, text), critic.head(tokens, temb, other))
    critic(b, x, t, traj.cond).sum().backward()
    assert critic.head.text_proj.weight.grad.abs().sum() > 0
    _, inputs = critic.values(b, traj, keep_features=True, steps=2)
    assert [tuple(x.shape[:1]) for x in inputs] == [(6,)] * 3 and inputs[2].shape[1:] == text.shape[1:]


def test_critic_backbone_starts_as_the_pretrained_one(backbones):
    b = backbones["tiny-dit"]()
    traj = rollout.sample(b, PROMPTS, 3, 0.7, generator=torch.Generator().manual_seed(0))
    critic = Critic(b)
    x, t = traj.latents[:, 1], traj.timesteps[[1, 1, 1]]
    with torch.no_grad():
        ours, base = b.features(x, t, traj.cond, net=critic.net), b.features(x, t, traj.cond)
    for a, c in zip(ours, base):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert critic.net is not b.net and all(p.requires_grad for p in critic.trainable_parameters())


def test_lora_policy_and_critic_share_one_base(backbones):
    """One base, two adapters: training the critic's adapter leaves the policy's forward alone,
    disabling adapters gives the base (the KL reference), and requires_grad survives switching."""
    b = backbones["sd3.5m-arch"]()
    traj = rollout.sample(b, PROMPTS, 3, 0.7, generator=torch.Generator().manual_seed(0))
    x, t = traj.latents[:, 1], traj.timesteps[[1, 1, 1]]
    with torch.no_grad():
        base = b.predict(x, t, traj.cond)
    torch.manual_seed(0)
    b.net.add_adapter(lora_config(b, 4, 8), adapter_name=POLICY)
    critic = Critic(b, lora=True, rank=4, alpha=8)
    b.net.set_adapter(POLICY)
    with torch.no_grad():
        for p in adapter_params(b.net, POLICY) + adapter_params(b.net, CRITIC):
            p.add_(0.05 * torch.randn_like(p))           # both adapters now do something
        policy_out = b.predict(x, t, traj.cond)
    assert (policy_out - base).abs().max() > 1e-4
    with torch.no_grad():
        critic.head.mlp[-1].weight.normal_()             # a non-zero head passes gradient back to the adapter
    opt = torch.optim.SGD(critic.trainable_parameters(), lr=1.0)
    critic(b, x, t, traj.cond).sum().backward()
    assert all(p.grad is None for p in adapter_params(b.net, POLICY))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_params(b.net, CRITIC))
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(b.predict(x, t, traj.cond), policy_out, rtol=0, atol=0)   # policy untouched
        with adapter(b.net, None) as net:
            torch.testing.assert_close(b.predict(x, t, traj.cond, net=net), base, rtol=0, atol=1e-6)
    assert b.net.active_adapters() == [POLICY]
    assert all(p.requires_grad for p in adapter_params(b.net, POLICY) + adapter_params(b.net, CRITIC))
    # the critic's checkpoint holds its adapter and head only, and loads back
    state = critic.state_dict_to_save()
    assert state and all(k.startswith(("head.", "lora.")) for k in state)
    assert not any(f".{POLICY}." in k for k in state)
    with torch.no_grad():
        for p in critic.trainable_parameters():
            p.zero_()
    critic.load_saved(state)
    assert all(torch.equal(v, critic.state_dict_to_save()[k]) for k, v in state.items())


def test_fit_learns_a_return_the_prompt_decides(backbones):
    """critic.fit (python critic.py, bench/value_ceiling.py): with R = 1 for one prompt and 0 for
    another, V_phi on fresh rollouts must tell them apart at every state of the window, pure
    noise included, and in R's units (fit returns the standardisation it used)."""
    b = backbones["tiny-dit"]()
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    prompts = ["a red circle", "two blue squares"] * 8

    def batch():
        traj = rollout.sample(b, prompts, 4, 0.7, generator=g, sde_steps=3)
        return traj, torch.tensor([1.0, 0.0] * 8)
    critic = Critic(b, num_rewards=1)
    mean, std = fit(b, critic, (batch() for _ in range(8)), head_lr=3e-3, minibatch=16, generator=g)
    assert (mean.item(), std.item()) == pytest.approx((0.5, 0.5), abs=1e-3)   # population std: the mixer's
    traj, R = batch()
    values = critic.values(b, traj, steps=3)[..., 0] * std + mean                 # (16, 3): window states only
    assert values.shape == (16, 3)
    for j in range(3):
        assert explained_variance(values[:, j], R) > 0.8


def test_one_critic_fitting_path(backbones, monkeypatch):
    """critic.fit and ppo.update regress V_phi through the same function (critic.regress, its loss
    critic.value_loss) on targets scaled the same way (rewards.RunningNorm, the mixer's statistics)."""
    import ppo
    import rewards
    assert ppo.regress is critic_module.regress and ppo.value_loss is critic_module.value_loss
    assert issubclass(rewards.RewardMixer, rewards.RunningNorm)
    b = backbones["tiny-dit"]()
    g = torch.Generator().manual_seed(0)
    traj = rollout.sample(b, ["a red circle"] * 4, 2, 0.7, generator=g)
    seen = []
    real = critic_module.regress
    monkeypatch.setattr(critic_module, "regress", lambda *a, **k: seen.append(a[5]) or real(*a, **k))
    R = torch.tensor([0.0, 1.0, 2.0, 3.0])
    mean, std = fit(b, Critic(b, num_rewards=1), [(traj, R)], minibatch=8, generator=g)
    scaled = rewards.RunningNorm(1).normalise(R[:, None])
    assert seen and torch.equal(torch.sort(torch.cat(seen).flatten()).values, torch.sort(scaled.repeat(2, 1).flatten()).values)
    assert (mean.item(), std.item()) == pytest.approx((R.mean().item(), R.std(unbiased=False).item()))


def _score(images, prompts, metas):
    """A reward of the images alone, deterministic and (N, 1): their mean brightness."""
    return images.mean(dim=(1, 2, 3))[:, None]


def test_the_oracle_is_the_mean_reward_of_its_continuations(backbones):
    """--critic oracle: V(x_k) is the mean of M continuations' rewards from x_k, each continuation
    (m, b) taking the noise Z[m, b, j] at step j whichever state it started from (common random
    numbers), through the rollout's own sampler (SDE window, then deterministic) and the policy's net.
    Recomputed here by hand from the same draw of Z. With the deterministic sampler every
    continuation is the trajectory itself: V(x_k) = R at every state."""
    b = backbones["tiny-dit"]()
    K, S, M = 4, 3, 3
    g = torch.Generator().manual_seed(0)
    traj = rollout.sample(b, PROMPTS, K, 0.7, generator=g, sde_steps=S)
    oracle = critic_module.build("oracle", b, score=_score, policy_net=b.net, continuations=M,
                                 generator=torch.Generator().manual_seed(1))
    values = oracle.values(b, traj, steps=S)
    assert values.shape == (3, S, 1) and oracle.cost["critic/continuation_images"] == M * 3 * S
    Z = rollout.randn_tensor((M, 3, S, *b.latent_shape), generator=torch.Generator().manual_seed(1))
    schedule = b.schedule(K)
    for i in range(3):
        for k in range(S):
            x = traj.latents[i:i + 1, k].repeat(M, 1, 1, 1)                      # (M, C, h, w)
            for j in range(k, K):
                jj = torch.full((M,), j)
                with torch.no_grad():
                    x = rollout.step(b, x, jj, traj.cond.index(torch.tensor([i] * M)), schedule, 0.7 if j < S else 0.0,
                                     noise=Z[:, i, j] if j < S else None)[0]
            torch.testing.assert_close(values[i, k, 0], _score(b.decode(x), None, None).mean(), rtol=1e-4, atol=1e-5)
    assert values[:, 0].std() > 0 and not torch.allclose(values[:, 0], values[:, -1])
    ode = rollout.sample(b, PROMPTS, K, 0.0, generator=g)
    torch.testing.assert_close(oracle.values(b, ode), _score(ode.images, None, None)[:, None].expand(3, K, 1),
                               rtol=1e-4, atol=1e-5)


def test_the_proxy_scores_the_predicted_clean_image(backbones):
    """--critic proxy: V(x_k) = r(decode(x0_hat(x_k))), the trajectory's own clean-image predictions."""
    b = backbones["tiny-unet"]()
    traj = rollout.sample(b, PROMPTS, 4, 1.0, generator=torch.Generator().manual_seed(0))
    proxy = critic_module.build("proxy", b, score=_score)
    values = proxy.values(b, traj, steps=3, last=True)                            # states 0, 1, 2 and x_(t_1)
    expected = torch.stack([_score(b.decode(traj.pred_x0[:, j]), None, None) for j in (0, 1, 2, 3)], 1)
    torch.testing.assert_close(values, expected)


@pytest.mark.parametrize("text", [False, True])
def test_the_head_reading_the_proxy(backbones, tmp_path, text):
    """--critic-proxy-input: the head's last input is the proxy of each state, r(decode(x0_hat)) of the
    trajectory's own predictions; V = 0 at initialisation; with the MLP silent and a gain of 1 at every
    noise level, V is the proxy itself (values() and regress(), the two paths that compute V); the gain
    learns; and a run trained so refuses to be loaded for steering, which does not compute x0_hat."""
    b = backbones["tiny-dit"]()
    traj = rollout.sample(b, PROMPTS, 4, 1.0, generator=torch.Generator().manual_seed(0), sde_steps=3)
    critic = critic_module.build("learned", b, score=_score, proxy_input=True, text=text)
    assert torch.equal(critic.values(b, traj, steps=3, last=True), torch.zeros(3, 4, 1))
    _, inputs = critic.values(b, traj, keep_features=True, steps=3, last=True)
    assert len(inputs) == 3 + text                                                # tokens, temb[, text], proxy
    proxy = critic_module.build("proxy", b, score=_score).values(b, traj, steps=3, last=True)       # (3, 4, 1)
    torch.testing.assert_close(inputs[-1], proxy.flatten(0, 1))                                    # rows b*F + f
    critic.head(*inputs).sum().backward()
    assert critic.head.proxy_gain[-1].weight.grad.abs().sum() > 0
    with torch.no_grad():
        critic.head.proxy_gain[-1].bias.fill_(1.0)
    torch.testing.assert_close(critic.values(b, traj, steps=3, last=True), proxy)
    idx, j = torch.tensor([0, 2, 1]), torch.tensor([1, 0, 3])
    loss = critic_module.regress(critic, b, traj, idx, j, torch.zeros(3, 1))
    torch.testing.assert_close(loss, 0.5 * (proxy[idx, j] ** 2).mean())
    # values() keeps its trajectory's proxies: regress on its states scores nothing again (the same
    # numbers); a state it did not read, or another trajectory, is scored afresh
    scored = []
    critic.score = lambda images, prompts, metas: scored.append(len(images)) or _score(images, prompts, metas)
    other = rollout.sample(b, PROMPTS, 4, 1.0, generator=torch.Generator().manual_seed(1), sde_steps=3)
    want = critic_module.build("proxy", b, score=_score).values(b, other)                          # (3, 4, 1)
    critic.values(b, other, steps=2, last=True)                                     # states 0, 1 and 3 of each row
    assert sum(scored) == 3 * 3
    critic_module.regress(critic, b, other, idx[:2], j[:2], torch.zeros(2, 1)).backward()
    torch.testing.assert_close(critic.proxy(b, other, idx, j), want[idx, j])         # steps 1, 0, 3: kept
    assert sum(scored) == 3 * 3
    torch.testing.assert_close(critic.proxy(b, other, idx, torch.tensor([2, 2, 0])), want[idx, [2, 2, 0]])
    assert sum(scored) == 3 * 3 + 3                                                 # step 2 was not read: scored
    critic.proxy(b, traj, idx[:2], j[:2])                                           # another trajectory: scored
    assert sum(scored) == 3 * 3 + 3 + 2
    plain = critic_module.build("learned", b, score=_score)                    # without proxy_input: no proxy read
    assert plain.head.proxy_gain is None and plain.proxy(b, traj, idx, j) is None
    (tmp_path / "config.json").write_text('{"critic": "learned", "rewards": "shapes", "critic_proxy_input": true}')
    with pytest.raises(critic_module.cli.InputError, match="--critic-proxy-input"):
        critic_module.load(b, str(tmp_path))


def test_the_fitted_proxy_is_a_line_fitted_without_the_row_itself(backbones):
    """--critic proxy-fit: V(x_k) for trajectory b = the least-squares line of R on the proxy at step k,
    fitted on the other trajectories (brute force below); its own reward never moves it; a line that
    holds exactly is recovered; two ranks' halves, their sums reduced, give the whole batch's values."""
    g = torch.Generator().manual_seed(0)
    x, R = torch.randn(10, 3, 2, generator=g), torch.randn(10, 2, generator=g)   # (B, F, R), (B, R)
    V = critic_module.loo_line(x, R)
    for b in range(10):
        others = [i for i in range(10) if i != b]
        for f in range(3):
            for r in range(2):
                xs, ys = x[others, f, r].double(), R[others, r].double()
                slope = ((xs - xs.mean()) * (ys - ys.mean())).mean() / xs.var(unbiased=False)
                want = ys.mean() + slope * (x[b, f, r].double() - xs.mean())
                assert abs(V[b, f, r].item() - want.item()) < 1e-5
    moved = R.clone()
    moved[4] += 10.0
    assert torch.equal(critic_module.loo_line(x, moved)[4], V[4]) and not torch.equal(critic_module.loo_line(x, moved)[5], V[5])
    exact = 3 * x[:, 1, :] + 0.5                                                  # R is a line of the proxy at state 1
    torch.testing.assert_close(critic_module.loo_line(x, exact)[:, 1], exact)
    sums = {}                                                                    # each half's own sums, as a rank's
    for name, rows in (("a", slice(0, 5)), ("b", slice(5, 10))):
        critic_module.loo_line(x[rows], R[rows], reduce=lambda t, name=name: sums.setdefault(name, t.clone()))
    split = torch.cat([critic_module.loo_line(x[:5], R[:5], reduce=lambda t: t + sums["b"]),
                       critic_module.loo_line(x[5:], R[5:], reduce=lambda t: t + sums["a"])])
    torch.testing.assert_close(split, V)
    # in place of the proxy: the line through the tiny backbone's own r(x0_hat) values
    b = backbones["tiny-unet"]()
    traj = rollout.sample(b, PROMPTS, 4, 1.0, generator=torch.Generator().manual_seed(0))
    rewards = torch.tensor([[0.2], [0.9], [0.4]])
    raw = critic_module.build("proxy", b, score=_score).values(b, traj, steps=3)
    fitted = critic_module.build("proxy-fit", b, score=_score)
    torch.testing.assert_close(fitted.values(b, traj, steps=3, rewards=rewards), critic_module.loo_line(raw, rewards))
    with pytest.raises(ValueError, match="rewards"):
        fitted.values(b, traj, steps=3)


def test_no_critic_is_zero_and_adaln_off_ignores_the_noise_level(backbones):
    """--critic none: V = 0 at every state; --critic-adaln off: the head reads no timestep embedding."""
    b = backbones["tiny-dit"]()
    traj = rollout.sample(b, PROMPTS, 3, 0.7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(critic_module.build("none", b, num_rewards=2).values(b, traj), torch.zeros(3, 3, 2))
    for adaln in (True, False):
        critic = Critic(b, adaln=adaln)
        with torch.no_grad():
            for p in critic.head.parameters():
                p.normal_(std=0.5)
        tokens, temb = critic.features(b, traj.latents[:, 1], traj.timesteps[[1, 1, 1]], traj.cond)
        moved = not torch.allclose(critic.head(tokens, temb), critic.head(tokens, temb + 1))
        assert moved == adaln and (critic.head.adaLN_modulation is None) == (not adaln)


def test_explained_variance():
    y = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(y, y) == pytest.approx(1.0)
    assert explained_variance(torch.full((4,), 2.5), y) == pytest.approx(0.0)
    assert explained_variance(-y, y) < 0
    values = torch.stack([torch.zeros(4), y, y], 1)             # (B=4, K=3)
    returns = torch.stack([y, y, y], 1)
    out = explained_variance_by_noise(values, returns, torch.tensor([1.0, 0.5, 0.05]))
    assert out == {"1.0-0.8": pytest.approx(0.0), "0.6-0.4": pytest.approx(1.0), "0.2-0.0": pytest.approx(1.0)}


@pytest.mark.parametrize("argv,words", [
    (["--batch", "0"], "--batch must be >= 1"),
    (["--minibatch", "0"], "--minibatch must be >= 1"),
    (["--iters", "0"], "--iters must be >= 1"),
    (["--eval-batches", "0"], "--eval-batches must be >= 1"),
    (["--lr", "nan"], "--lr must be finite"),
    (["--model", "sd3.5m"], "built-in world only"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, argv, words):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "critic.py"), *argv], capture_output=True, text=True,
                       cwd=tmp_path)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr
