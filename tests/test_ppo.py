"""ppo.py: GAE and the clipped losses against hand-computed cases (METHOD.md 4-5), GRPO's
group advantage, skipping non-finite updates, and the DDP guard: one update on 2 processes
(gloo, CPU) gives the same weights as one process with the full batch."""
import copy
import math
import os
from types import SimpleNamespace

import pytest
import torch

import ppo


def test_gae_hand_computed():
    # K = 3 steps, one reward R = 1, gamma = 0.9, lambda = 0.8, V = (0.2, 0.5, 0.1)
    values = torch.tensor([0.2, 0.5, 0.1]).view(1, 3, 1)
    advantages, returns = ppo.gae(torch.tensor([[1.0]]), values, gamma=0.9, gae_lambda=0.8)
    # last step: delta = 1 + 0 - 0.1 = 0.9;  A = 0.9
    # middle:    delta = 0.9 * 0.1 - 0.5 = -0.41;  A = -0.41 + 0.72 * 0.9 = 0.238
    # first:     delta = 0.9 * 0.5 - 0.2 = 0.25;   A = 0.25 + 0.72 * 0.238 = 0.42136
    torch.testing.assert_close(advantages.flatten(), torch.tensor([0.42136, 0.238, 0.9]))
    torch.testing.assert_close(returns.flatten(), torch.tensor([0.62136, 0.738, 1.0]))


def test_gae_lambda_one_is_reward_minus_value():
    g = torch.Generator().manual_seed(0)
    values, rewards = torch.randn(5, 4, 2, generator=g), torch.randn(5, 2, generator=g)   # 2 rewards
    advantages, returns = ppo.gae(rewards, values, gamma=1.0, gae_lambda=1.0)
    torch.testing.assert_close(advantages, rewards[:, None] - values)
    torch.testing.assert_close(returns, rewards[:, None].expand_as(values))
    # lambda = 0: one-step TD errors, V_{k-1} - V_k before the last step
    advantages, _ = ppo.gae(rewards, values, gamma=1.0, gae_lambda=0.0)
    torch.testing.assert_close(advantages[:, :-1], values[:, 1:] - values[:, :-1])
    torch.testing.assert_close(advantages[:, -1], rewards - values[:, -1])


def test_clipped_policy_loss_hand_computed():
    old = torch.zeros(3)
    new = torch.log(torch.tensor([1.2, 0.7, 1.05])).requires_grad_(True)
    advantages = torch.tensor([1.0, 1.0, -1.0])
    loss, ratio, _ = ppo.clipped_policy_loss(new, old, advantages, 0.1, torch.ones(3))
    # -A rho = (-1.2, -0.7, 1.05); -A clip(rho) = (-1.1, -0.9, 1.05); max = (-1.1, -0.7, 1.05)
    assert loss.item() == pytest.approx((-1.1 - 0.7 + 1.05) / 3, abs=1e-6)
    loss.backward()
    # the clipped sample (rho = 1.2 > 1 + eps with A > 0) gets no gradient; the others -A rho / 3
    torch.testing.assert_close(new.grad, torch.tensor([0.0, -0.7 / 3, 1.05 / 3]))
    # the mask leaves a step out entirely
    loss, _, _ = ppo.clipped_policy_loss(new, old, advantages, 0.1, torch.tensor([1.0, 0.0, 1.0]))
    assert loss.item() == pytest.approx((-1.1 + 1.05) / 2, abs=1e-6)


def test_value_loss_hand_computed():
    new, returns, old = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [1.0]]), torch.tensor([[0.5], [0.5]])
    assert ppo.value_loss(new, returns, old).item() == pytest.approx(0.5)
    # clipped to V_old +- 0.2: (0.7 - 0)^2 = 0.49 < 1 for the first; (0.3 - 1)^2 = 0.49 < 1 for the second
    assert ppo.value_loss(new, returns, old, vf_clip=0.2).item() == pytest.approx(0.5)
    new = torch.tensor([[0.6], [0.4]])                  # inside the clip: plain squared error
    assert ppo.value_loss(new, returns, old, vf_clip=0.2).item() == pytest.approx(0.5 * (0.36 + 0.36) / 2)
    # V jumped onto its targets, past V_old +- 0.2: the plain error is 0, the clipped one is not, and
    # the loss is the worse of the two: V_clipped = (0.2, 0.3), errors (0.2 - 1)^2 = 0.64 and 0.3^2 = 0.09
    new, returns, old = torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [0.5]])
    assert ppo.value_loss(new, returns, old).item() == 0.0
    assert ppo.value_loss(new, returns, old, vf_clip=0.2).item() == pytest.approx(0.5 * (0.64 + 0.09) / 2)


def test_grpo_advantages():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    a = ppo.grpo_advantages(rewards, group_size=4)
    std = math.sqrt(1.25)                              # population std of 1..4
    torch.testing.assert_close(a[:4], torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-4))
    torch.testing.assert_close(a[4:], torch.zeros(4))  # a group that all agrees teaches nothing


def test_normalise_uses_only_masked_steps():
    adv = torch.tensor([[1.0, 3.0, 100.0]])
    out = ppo.normalise(adv, torch.tensor([[True, True, False]]))
    torch.testing.assert_close(out[0, :2], torch.tensor([-1.0, 1.0]), atol=1e-6, rtol=0)


def test_normalise_per_step_removes_a_critics_per_step_bias():
    """A critic off by a constant b_k at step k: centred per step, R - V gives exactly what V = 0 gives
    (the batch-normalised return at every step); centred over the batch, b_k stays as an offset."""
    g = torch.Generator().manual_seed(0)
    R = torch.randn(64, 1, generator=g)                                  # (B, 1)
    b = torch.tensor([[2.0, -1.0, 0.5, 0.0]])                            # (1, K)
    mask = torch.ones(64, 4, dtype=torch.bool)
    want = ppo.normalise(R.expand(64, 4), mask)                          # V = 0
    torch.testing.assert_close(ppo.normalise(R - b, mask, per_step=True), want)
    assert (ppo.normalise(R - b, mask) - want).abs().max() > 0.5
    # masked steps count in neither the means nor the scale
    adv = torch.cat([R - b, torch.full((64, 1), 1e3)], 1)
    out = ppo.normalise(adv, torch.cat([mask, torch.zeros(64, 1, dtype=torch.bool)], 1), per_step=True)
    torch.testing.assert_close(out[:, :4], want)
    # one scale for all steps: a step that varies twice as much keeps twice the advantage
    out = ppo.normalise(R * torch.tensor([[1.0, 2.0]]), mask[:, :2], per_step=True)
    assert out[:, 1].std().item() == pytest.approx(2 * out[:, 0].std().item(), rel=1e-5)


def test_nonfinite_loss_skips_the_step():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    grad_norm, skipped = ppo.optimiser_step((w * float("nan")).sum(), [w], opt, 1.0)
    assert skipped and torch.equal(w.detach(), torch.ones(3)) and not opt.state
    grad_norm, skipped = ppo.optimiser_step((w * 2).sum(), [w], opt, 1.0)
    assert not skipped and grad_norm == pytest.approx(2 * math.sqrt(3)) and (w.detach() < 1).all()


def test_collectives_go_to_the_device_the_backend_serves(monkeypatch):
    """NCCL serves CUDA tensors only. A "cuda:gloo" group emulates that on a CPU machine: gloo is
    registered for CUDA alone, and a CPU tensor fails exactly as under NCCL. ppo.collective sends
    such a group's tensors to the CUDA device (this machine has none to run them on: the move itself
    is left to a GPU run), and leaves them where they are under plain gloo. That the training loop
    makes every collective through ppo.collective is test_train.py's torchrun test."""
    import torch.distributed as dist
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)      # no CUDA here to ask
    dist.init_process_group("cuda:gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.ones(1))                            # the crash at iteration 1, emulated
        assert ppo.comm_device("cpu") == torch.device("cuda", 0)
        assert ppo.comm_device("cuda:0") == torch.device("cuda", 0)
    finally:
        dist.destroy_process_group()
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        assert ppo.comm_device("cpu") == torch.device("cpu")
        assert ppo.collective("sum", torch.ones(2)).tolist() == [1.0, 1.0]   # one process: nothing to do
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- update() logs and KL penalty

@pytest.fixture(scope="module")
def tiny_rollout(tmp_path_factory):
    """A tiny random SD3 and 2 trajectories of 3 steps whose first 2 are stochastic (the last,
    deterministic, has no density: every log of update() must leave it out)."""
    import rollout
    from models import load_backbone
    from tiny import make_tiny_sd3
    backbone = load_backbone(make_tiny_sd3(str(tmp_path_factory.mktemp("sd3"))))
    traj = rollout.sample(backbone, ["a red circle", "two squares"], 3, 0.7, generator=torch.Generator().manual_seed(0),
                          sde_steps=2)
    assert (traj.stds[:2] > 0).all() and traj.stds[2] == 0
    return backbone, traj


def _all_pairs(B, K):
    return [t.flatten() for t in torch.meshgrid(torch.arange(B), torch.arange(K), indexing="ij")]   # (B*K,) each


def test_update_logs_approx_kl_and_clipfrac_hand_computed(tiny_rollout):
    """The old log-probs are set to the current ones minus chosen log-ratios d, so rho = exp(d)."""
    import rollout
    backbone, traj = tiny_rollout
    idx, j = _all_pairs(2, 3)
    with torch.no_grad():
        log_prob, _, _ = rollout.recompute_log_prob(backbone, traj, idx, j)
    # stochastic steps: d = 0, 0.097, -0.3, 0.05; the deterministic step's d = 1 must not count
    d = torch.tensor([[0.0, 0.097, 1.0], [-0.3, 0.05, 1.0]])
    mine = copy.copy(traj)
    mine.log_probs = log_prob.view(2, 3) - d
    args = SimpleNamespace(epochs=1, minibatch_per_rank=6, clip_range=0.1, kl_coef=0.0, vf_clip=0.0, max_grad_norm=1.0)
    policy = copy.deepcopy(backbone.net).requires_grad_(True)
    logs = ppo.update(backbone, mine, torch.ones(2, 3), None, None, policy, backbone.net, None,
                      torch.optim.SGD(policy.parameters(), lr=0.0), None, args, torch.Generator().manual_seed(0))
    # k3: mean of (e^d - 1) - d = (0 + 0.0049032 + 0.0408182 + 0.0012711) / 4
    assert logs["losses/approx_kl"] == pytest.approx(0.0117374, rel=1e-3)
    # |rho - 1| = 0, 0.1019, 0.2592, 0.0513 against eps = 0.1: two of the four left [1 - eps, 1 + eps]
    # (0.097 itself is inside 0.1: the fraction is of the ratio, not of the log-ratio)
    assert logs["losses/clipfrac"] == pytest.approx(0.5)
    assert logs["losses/ratio_dev_first"] == pytest.approx(0.2591818, rel=1e-3)


def test_kl_penalty_hand_computed_and_pulls_toward_the_reference(tiny_rollout):
    """A policy away from the frozen base, zero advantages (the clipped loss has no gradient), so
    the KL penalty alone moves it: its logged value is the hand-computed one, and one step lowers it."""
    import rollout
    backbone, traj = tiny_rollout
    torch.manual_seed(0)
    policy = copy.deepcopy(backbone.net).requires_grad_(True)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    idx, j = _all_pairs(2, 2)                          # the stochastic steps: the deterministic one has no KL

    def kl():
        """The penalty by hand (the paper's section 5): the mean over steps of the element mean
        of (mu_theta - mu_ref)^2 / (2 step_std^2)."""
        with torch.no_grad():
            _, mu, std = rollout.recompute_log_prob(backbone, traj, idx, j, net=policy)
            _, mu_ref, _ = rollout.recompute_log_prob(backbone, traj, idx, j, net=backbone.net)
        return ((mu - mu_ref) ** 2 / (2 * std.view(-1, 1, 1, 1) ** 2)).mean(dim=(1, 2, 3)).mean().item()

    before = kl()
    assert before > 1e-3
    args = SimpleNamespace(epochs=1, minibatch_per_rank=6, clip_range=0.1, kl_coef=0.5, vf_clip=0.0, max_grad_norm=1e9)
    logs = ppo.update(backbone, traj, torch.zeros(2, 3), None, None, policy, backbone.net, None,
                      torch.optim.SGD(policy.parameters(), lr=1.0), None, args, torch.Generator().manual_seed(0))
    assert logs["losses/kl_loss"] == pytest.approx(before, rel=1e-4)
    assert logs["losses/pg_loss"] == 0.0
    after = kl()
    assert after < 0.99 * before, (before, after)      # descends the penalty (a flipped sign climbs it)


# ----------------------------------------------------------------------------- DDP equivalence

B, K = 4, 3


def _one_update(model_dir, rank, world, out_path):
    """Every process rolls out the same B trajectories, keeps its share, and runs one update."""
    import rollout
    from critic import Critic
    from models import load_backbone
    backbone = load_backbone(model_dir)
    traj = rollout.sample(backbone, ["a red circle", "two squares", "a cat", "a dog"], K, 0.7,
                          generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    advantages, returns, old_values = torch.randn(B, K, generator=g), torch.randn(B, K, 1, generator=g), torch.zeros(B, K, 1)
    torch.manual_seed(0)
    policy = copy.deepcopy(backbone.net).requires_grad_(True)
    critic = Critic(backbone, 1)
    with torch.no_grad():                     # a non-zero head, so the critic's gradient reaches its backbone
        critic.head.mlp[-1].weight.normal_()
    # SGD without clipping: Adam and norm clipping would hide a gradient that is 2x too large
    opt_p = torch.optim.SGD(policy.parameters(), lr=1e-2)
    opt_c = torch.optim.SGD(critic.trainable_parameters(), lr=1e-2)
    share = slice(rank * B // world, (rank + 1) * B // world)
    idx = torch.arange(B)[share]
    mine = copy.copy(traj)
    for f in ("latents", "log_probs", "means", "pred_x0", "images"):
        setattr(mine, f, getattr(traj, f)[share])
    mine.cond, mine.prompts = traj.cond.index(idx), traj.prompts[share]
    adv = ppo.normalise(advantages[share], torch.ones(len(idx), K, dtype=torch.bool))   # over the global batch
    args = SimpleNamespace(epochs=1, minibatch_per_rank=len(idx) * K, clip_range=0.2, kl_coef=0.1, vf_clip=0.0,
                           max_grad_norm=1e9)
    logs = ppo.update(backbone, mine, adv, returns[share], old_values[share], policy, backbone.net, critic, opt_p, opt_c,
                      args, torch.Generator().manual_seed(2))
    moved = max((p - q).abs().max().item() for p, q in zip(policy.parameters(), backbone.net.parameters()))
    if rank == 0:
        torch.save({"policy": policy.state_dict(), "critic": critic.state_dict(), "logs": logs, "moved": moved}, out_path)


def _worker(rank, world, model_dir, out_path, port):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _one_update(model_dir, rank, world, out_path)
    finally:
        dist.destroy_process_group()


def test_ddp_update_equals_full_batch(tmp_path):
    """The field's classic bug: gradients summed (not averaged) over ranks, or advantages
    normalised per rank. Two processes with half the batch each must end with exactly the
    weights of one process with the whole batch."""
    import socket
    import torch.multiprocessing as mp
    from tiny import make_tiny_sd3
    model_dir = make_tiny_sd3(str(tmp_path / "sd3"))
    _one_update(model_dir, 0, 1, str(tmp_path / "single.pt"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, model_dir, str(tmp_path / "ddp.pt"), port), nprocs=2, join=True)
    single, ddp = torch.load(tmp_path / "single.pt", weights_only=True), torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert single["logs"]["losses/ratio_dev_first"] < 1e-5
    assert single["moved"] > 1e-4                       # the update did something
    for part in ("policy", "critic"):
        for k, v in single[part].items():
            torch.testing.assert_close(ddp[part][k], v, atol=1e-6, rtol=1e-5, msg=f"{part} {k}")
    for k in ("losses/pg_loss", "losses/value_loss", "losses/grad_norm/policy", "losses/grad_norm/critic"):
        assert ddp["logs"][k] != pytest.approx(0.0)
