"""One update of critic-guided PPO or of GRPO: the same clipped loss, two ways to get the
advantage (arXiv 2605.27736; METHOD.md sections 4-5).

| paper (METHOD.md) | here |
|---|---|
| delta_k, A_k, G_k (4) | delta, advantages, returns in gae() |
| gamma, lambda (4) | gamma, gae_lambda (--gamma, --gae-lambda) |
| rho, eps (5) | ratio, clip_range in clipped_policy_loss() (--clip-range) |
| L_policy, L_value, L_kl, beta (5) | pg_loss, v_loss (critic.regress), kl_loss, args.kl_coef in update() |
| GRPO's (R - mean_group) / (std + 1e-4) (5) | grpo_advantages() |

Not in the paper: the critic's share (--critic-fraction: its backbone trains on the first
critic_pairs pairs of each shuffled epoch, which sets its cost per image) and --head-epochs
(the value head alone on every state, on features the rollout-time value pass computed anyway);
METHOD.md 9 says why. raft_update is RAFT, the supervised reference, not the paper's method.

  gae()              advantages and returns over the K denoising steps: sparse terminal
                     reward, V_0 := 0 after the last step, gamma and lambda (section 4)
  grpo_advantages()  GRPO's baseline: G samples per prompt, (R - group mean) / (group std + 1e-4),
                     the same for every step of a trajectory (section 5, "The baseline")
  normalise()        advantages over the global batch (every rank), then clipped
  collective()       every all-reduce and all-gather of training, on a device the process
                     group's backend serves (NCCL: CUDA only), and back
  update()           epochs of shuffled minibatches of (trajectory, step) pairs: the clipped
                     policy loss, the optional KL penalty to the frozen base on step means,
                     the (optionally clipped) value loss; returns the per-update logs

Logs (the names CleanRL uses, under losses/):
  approx_kl       k3 estimator mean((rho - 1) - log rho) of KL(pi_old || pi_theta), per step
  clipfrac        fraction of steps whose ratio left [1 - eps, 1 + eps]
  ratio_dev_first max |rho - 1| over the first minibatch, before any optimiser step: must be
                  ~0 (< 1e-5 in fp32). A tripwire: anything else means the training forward is
                  not the rollout's (precision, CFG, dropout, a stale net)
  grad_norm/*     gradient norms before clipping, mean over minibatches
  skipped         minibatch updates skipped because a loss or a gradient was not finite
  overflows       fp16 only: steps skipped because a scaled gradient overflowed (LossScale); the
                  scale halves, as torch.amp.GradScaler's does, and these are not counted as skipped

References
  1. CleanRL, ppo_continuous_action.py: GAE as a reversed loop, the clipped losses, the logs.
  2. Flow-GRPO (arXiv 2505.05470) and DDPO (kvablack/ddpo-pytorch): the group advantage, the
     tiny clip range of a per-element-mean log-probability, advantage clipping.

Test: tests/test_ppo.py
"""
import math
import os

import torch
import torch.distributed as dist

import rollout
from critic import CRITIC, POLICY, adapter, regress, value_loss


def gae(rewards, values, gamma=1.0, gae_lambda=1.0):
    """rewards (B, R): the terminal reward of each trajectory (one column per reward);
    values (B, K, R): V_phi of the states of steps j = 0..K-1 (the paper's k = K..1), recorded
    at rollout time. Returns advantages and returns (B, K, R); returns = advantages + values
    are the critic's regression targets. gamma = lambda = 1 gives A = R - V (Monte Carlo with
    a state-dependent baseline)."""
    B, K, R = values.shape
    advantages = torch.zeros_like(values)
    lastgaelam = torch.zeros(B, R, dtype=values.dtype)
    for j in reversed(range(K)):
        if j == K - 1:                  # the last step: the reward arrives, x_0 is terminal (V_0 := 0)
            reward, next_value = rewards, torch.zeros_like(rewards)
        else:                           # every other step: r_k = 0
            reward, next_value = torch.zeros_like(rewards), values[:, j + 1]
        delta = reward + gamma * next_value - values[:, j]
        advantages[:, j] = lastgaelam = delta + gamma * gae_lambda * lastgaelam
    return advantages, advantages + values


def grpo_advantages(rewards, group_size, eps=1e-4):
    """rewards (B,) of B = n_prompts * G trajectories, each prompt's G samples adjacent ->
    (B,): (R - group mean) / (group std + eps). Population std, as Flow-GRPO."""
    grouped = rewards.view(-1, group_size)                                   # (n_prompts, G)
    mean, std = grouped.mean(1, keepdim=True), grouped.std(1, keepdim=True, unbiased=False)
    return ((grouped - mean) / (std + eps)).flatten()


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if world_size() > 1 else 0


def comm_device(device):
    """Where a tensor on `device` must be for the process group's backend: its own device if the
    backend serves that device type (gloo: CPU and CUDA), else the backend's own (NCCL serves CUDA
    only: a CPU tensor fails with "No backend type associated with device type cpu")."""
    device = torch.device(device)
    served = [entry.split(":")[0] for entry in dist.get_backend_config().split(",")]   # e.g. "cpu:gloo,cuda:gloo"
    if device.type in served:
        return device
    if served[0] == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(served[0])


def collective(op, t):
    """Every collective of training goes through here: 'sum' (all-reduce, in place and returned),
    'gather' ((n, ...) on every rank -> (world * n, ...) in rank order) or 'broadcast' (rank 0's t on
    every rank, in place and returned). t is moved to the device the
    backend serves and the result comes back on t's device, so a CPU tensor (a flag, the advantage
    statistics, rewards scored on CPU) is safe under NCCL."""
    if world_size() == 1:
        return t
    x = t.to(comm_device(t.device)).contiguous()
    if op == "sum":
        dist.all_reduce(x)
        t.copy_(x)                                  # in place, as dist.all_reduce
        return t
    if op == "broadcast":
        dist.broadcast(x, src=0)
        t.copy_(x)
        return t
    if op == "gather":
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x)
        return torch.cat(out).to(t.device)
    raise ValueError(f"unknown collective {op!r}")


def all_reduce_sum(t):
    return collective("sum", t)


def setup_distributed(device, timeout_minutes=30):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is one process. timeout_minutes:
    how long a collective waits for the other ranks (NCCL's own default, 10 minutes, can pass while a
    node with a cold weight cache loads SD3.5-M before the base model's evaluation)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    import datetime
    cuda = torch.device(device).type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return dist.get_rank(), dist.get_world_size(), torch.device(device)


def rank0_text(text):
    """Rank 0's string on every rank: what each rank would otherwise name for itself, such as the
    default run directory, named by the time on each rank's clock (ranks a second apart would
    checkpoint into different directories)."""
    if world_size() == 1:
        return text
    data = torch.tensor(list(text.encode()), dtype=torch.uint8)
    n = int(collective("broadcast", torch.tensor([len(data)])))              # rank 0's length
    data = data if rank() == 0 else torch.zeros(n, dtype=torch.uint8)
    return bytes(collective("broadcast", data).tolist()).decode()


def all_gather(t):
    """(n, ...) on every rank -> (world * n, ...) in rank order, on every rank."""
    return collective("gather", t)


def barrier():
    if world_size() > 1:
        dist.barrier()


def normalise(advantages, mask, per_step=False, eps=1e-8):
    """advantages (B, K) -> zero mean, unit std over the steps where mask (B, K), computed over
    the global batch (all ranks), not per rank.
    per_step: centre each step k on its own batch mean (then one std over all steps). A critic whose
    bias differs by noise level (the proxy's, or a head still learning) leaves step k a constant
    offset b_k in R - V(x_k); centred over all (trajectory, step) pairs, that offset pushes every
    trajectory's step k the same way, pure noise in the gradient. A per-step batch mean is a baseline
    as the batch mean is (each row's own weight in it is 1/N), so centring on it removes b_k."""
    m = mask.to(advantages.dtype)
    dims = 0 if per_step else (0, 1)
    stats = all_reduce_sum(torch.stack([(advantages * m).sum(dims), (advantages ** 2 * m).sum(dims),
                                        m.sum(dims)]).double())                            # (3,) or (3, K)
    mean = stats[0] / stats[2].clamp(min=1)
    centred = advantages - mean.to(advantages.dtype)
    # one scale for all steps: a per-step std would inflate the steps that decide little
    var = ((stats[1] - stats[0] * mean).sum() / stats[2].sum()).clamp(min=0)
    return (centred / (var.sqrt() + eps)).to(advantages.dtype)


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def clipped_policy_loss(log_prob, old_log_prob, advantages, clip_range, mask):
    """PPO's clipped surrogate, all (N,): mean over mask of max(-A rho, -A clip(rho, 1 - eps, 1 + eps)).
    The clip range is ~1e-4, not 0.2, because log_prob is a mean over latent elements.
    Returns the loss, rho and log rho."""
    logratio = log_prob - old_log_prob
    ratio = logratio.exp()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return masked_mean(torch.max(pg_loss1, pg_loss2), mask), ratio, logratio


class LossScale:
    """fp16's dynamic loss scale, as torch.amp.GradScaler keeps it: the loss is multiplied by `value`
    before backward, so that small log-prob gradients (a mean over every latent element) do not
    underflow in the fp16 activations' gradients, and the gradients are divided by it after; a
    gradient that overflowed halves it (that step is skipped), growth_interval clean steps double it.
    The trained parameters themselves are fp32 (train.build), so only the backward pass is scaled."""

    def __init__(self, value=2.0 ** 16, growth_interval=2000):
        self.value, self.growth_interval, self.clean, self.overflows = value, growth_interval, 0, 0

    def update(self, overflowed):
        if overflowed:
            self.value, self.clean, self.overflows = self.value / 2, 0, self.overflows + 1
        else:
            self.clean += 1
            if self.clean == self.growth_interval:
                self.value, self.clean = self.value * 2, 0

    def state_dict(self):
        return {"value": self.value, "clean": self.clean}

    def load_state_dict(self, state):
        self.value, self.clean = float(state["value"]), int(state["clean"])


def optimiser_step(loss, params, optimiser, max_grad_norm):
    """backward, average the gradients over ranks (DDP by hand: the batch is each rank's share
    and every loss is a mean, so the average over ranks is the gradient of the global mean),
    clip, step. Skips the step on every rank if any rank's loss or gradient is not finite, so
    weights are never corrupted and the ranks never diverge. Returns (grad norm, skipped).
    An optimiser with a loss_scale (a LossScale: fp16) backpropagates the scaled loss; an overflow
    of its gradients (the loss finite) halves the scale and skips the step, not counted as skipped."""
    optimiser.zero_grad(set_to_none=True)      # None, not 0: Adam must not move params this loss does not touch
    scaler = getattr(optimiser, "loss_scale", None)
    scale = scaler.value if scaler is not None else 1.0
    ok = torch.isfinite(loss).item()
    if ok:
        (loss * scale).backward()
    world = world_size()
    if world > 1:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten() for g in grads] + [torch.tensor([0.0 if ok else 1.0], device=grads[0].device)])
        all_reduce_sum(flat)
        ok = flat[-1].item() == 0
        offset = 0
        for p, g in zip(params, grads):
            p.grad = (flat[offset:offset + g.numel()] / world).view_as(p)
            offset += g.numel()
    if ok and scale != 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.div_(scale)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item() if ok else float("nan")
    if not (ok and math.isfinite(grad_norm)):
        optimiser.zero_grad(set_to_none=True)
        if ok and scaler is not None:              # a finite loss whose scaled gradient overflowed
            scaler.update(overflowed=True)
            return grad_norm, False
        return grad_norm, True
    if scaler is not None:
        scaler.update(overflowed=False)
    optimiser.step()
    return grad_norm, False


def update(backbone, traj, advantages, returns, old_values, policy_net, ref_net, critic, opt_policy, opt_critic,
           args, generator, train_policy=True, critic_pairs=None, features=None):
    """One update on a batch of B trajectories of K steps (this rank's share).

    advantages (B, K): normalised, clipped, summed over rewards, for the K trained steps (the
    first K of the trajectory: its SDE window); returns, old_values (B, K, R) (None for GRPO,
    which has no critic). Policy and critic see the same shuffled minibatches
    of args.minibatch_per_rank (trajectory, step) pairs, for args.epochs epochs.
    ref_net is the frozen base for the KL penalty (the LoRA base with adapters off, or the
    untouched pretrained net). train_policy=False is value pretraining (--value-warmup).
    critic_pairs: the critic (backbone and head) trains on only the first n pairs of each epoch's
    shuffled order (a random share), which sets its cost per image; None = all of them.
    features: the value head's own data, (*inputs, returns (M, R), old_values (M, R)) for M states,
    inputs being what Critic.features gives (tokens (M, N, D), temb (M, E)[, text (M, L, T)][, proxy (M, R)]):
    this batch's from the rollout-time value pass, and with
    train.py --critic-replay those of recent iterations too; if given, the value head alone first
    takes args.head_epochs passes over every one of them, at a fraction of a backbone pass's cost
    (the backbone learns only in the minibatches above)."""
    B, K = advantages.shape          # K: the trained steps, the first traj.sde_steps (all by default)
    b_idx, b_j = [t.flatten() for t in torch.meshgrid(torch.arange(B), torch.arange(K), indexing="ij")]  # (B*K,)
    policy_params = [p for group in opt_policy.param_groups for p in group["params"]] if train_policy else []
    logs = {k: [] for k in ("pg_loss", "kl_loss", "approx_kl", "clipfrac", "grad_norm/policy", "value_loss",
                            "grad_norm/critic")}
    skipped, ratio_dev_first = 0, None
    if features is not None:
        *inputs, h_returns, h_old = features                  # (M, N, D), (M, E)[, (M, L, T)][, (M, R)], (M, R), (M, R)
        head_params = list(critic.head.parameters())
        device = returns.device
        for epoch in range(args.head_epochs):
            for mb in torch.randperm(len(h_returns), generator=generator).split(args.minibatch_per_rank):
                v_loss = value_loss(critic.head(*(x[mb].to(device) for x in inputs)), h_returns[mb].to(device),
                                    h_old[mb].to(device), args.vf_clip)
                grad_norm, skip = optimiser_step(v_loss, head_params, opt_critic, args.max_grad_norm)
                skipped += skip
                logs.setdefault("head_value_loss", []).append(v_loss.item())
    for epoch in range(args.epochs):
        perm = torch.randperm(B * K, generator=generator)
        for start in range(0, B * K, args.minibatch_per_rank):
            mb = perm[start:start + args.minibatch_per_rank]
            mb_idx, mb_j = b_idx[mb], b_j[mb]
            if train_policy:
                with adapter(policy_net, POLICY) as net:
                    log_prob, mu, std = rollout.recompute_log_prob(backbone, traj, mb_idx, mb_j, net=net)
                mask = (std > 0).float()     # a deterministic step has no density: no policy gradient
                pg_loss, ratio, logratio = clipped_policy_loss(log_prob, traj.log_probs[mb_idx, mb_j],
                                                               advantages[mb_idx, mb_j], args.clip_range, mask)
                kl_loss = torch.zeros(())
                if args.kl_coef > 0:
                    with torch.no_grad(), adapter(ref_net, None) as net:
                        _, mu_ref, _ = rollout.recompute_log_prob(backbone, traj, mb_idx, mb_j, net=net)
                    safe = torch.where(std > 0, std, torch.ones_like(std)).view(-1, 1, 1, 1)
                    kl_loss = masked_mean(((mu - mu_ref) ** 2 / (2 * safe ** 2)).mean(dim=(1, 2, 3)), mask)
                loss = pg_loss + args.kl_coef * kl_loss
                with torch.no_grad():
                    if ratio_dev_first is None:
                        ratio_dev_first = ((ratio - 1).abs() * mask).max().item()
                    logs["approx_kl"].append(masked_mean((ratio - 1) - logratio, mask).item())
                    logs["clipfrac"].append(masked_mean(((ratio - 1).abs() > args.clip_range).float(), mask).item())
                # each backward under the adapter its forward ran with: under --gradient-checkpointing diffusers
                # re-runs every block during backward, and peft's LoRA layers read the adapter active *then*
                with adapter(policy_net, POLICY):
                    grad_norm, skip = optimiser_step(loss, policy_params, opt_policy, args.max_grad_norm)
                skipped += skip
                logs["pg_loss"].append(pg_loss.item()), logs["kl_loss"].append(kl_loss.item())
                logs["grad_norm/policy"].append(grad_norm)
            take = len(mb) if critic_pairs is None else max(0, min(len(mb), critic_pairs - start))
            if critic is not None and critic.learned and take:    # not the controls (critic.py): they learn nothing
                mb_idx, mb_j = mb_idx[:take], mb_j[:take]
                v_loss = regress(critic, backbone, traj, mb_idx, mb_j, returns[mb_idx, mb_j],   # critic.fit's loss
                                 old_values[mb_idx, mb_j], args.vf_clip)
                with adapter(critic.backbone_net, CRITIC):           # (see the policy's backward)
                    grad_norm, skip = optimiser_step(v_loss, critic.trainable_parameters(), opt_critic,
                                                     args.max_grad_norm)
                skipped += skip
                logs["value_loss"].append(v_loss.item()), logs["grad_norm/critic"].append(grad_norm)
    out = {f"losses/{k}": sum(v) / len(v) for k, v in logs.items() if v}
    out["losses/skipped"] = skipped
    scalers = [getattr(o, "loss_scale", None) for o in (opt_policy, opt_critic)]
    if any(scalers):                               # fp16: this update's overflows, then the count starts again
        out["losses/overflows"] = sum(s.overflows for s in scalers if s)
        out["losses/loss_scale"] = scalers[0].value
        for s in filter(None, scalers):
            s.overflows = 0
    if ratio_dev_first is not None:
        out["losses/ratio_dev_first"] = ratio_dev_first
    return out


def raft_update(backbone, traj, keep, policy_net, opt_policy, args, generator):
    """Rejection-sampling fine-tuning (RAFT; the supervised reference beside PPO and GRPO, not
    the paper's method): args.raft_steps optimiser steps of the pretraining loss
    (models.denoising_loss) on the final latents x_0 of the kept trajectories (keep: (B,) bool,
    e.g. the strict passes), each step on a random minibatch of args.minibatch_per_rank of them,
    conditioned on the prompts they were sampled for. A rank with nothing kept still takes part
    in every (averaged) step with a zero loss, so the ranks stay in step."""
    from models import denoising_loss
    kept = keep.nonzero().flatten()
    params = [p for group in opt_policy.param_groups for p in group["params"]]
    logs = {"losses/raft_loss": [], "grad_norm/policy": []}
    skipped = 0
    for _ in range(args.raft_steps):
        if len(kept):
            mb = kept[torch.randint(len(kept), (min(len(kept), args.minibatch_per_rank),), generator=generator)]
            with adapter(policy_net, POLICY) as net:
                loss = denoising_loss(backbone.sampler, backbone.scheduler, net, traj.latents[mb, -1],
                                      traj.cond.index(mb).cond)
        else:
            loss = sum(p.sum() for p in params) * 0.0
        grad_norm, skip = optimiser_step(loss, params, opt_policy, args.max_grad_norm)
        skipped += skip
        logs["losses/raft_loss"].append(loss.item()), logs["grad_norm/policy"].append(grad_norm)
    out = {k: sum(v) / len(v) for k, v in logs.items()}
    out.update({"losses/skipped": skipped, "losses/raft_kept": len(kept) / len(keep)})
    return out
