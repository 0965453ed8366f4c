"""Critic-guided sampling at inference: the learned critic steers the sampler (arXiv 2605.27736,
its Figs. 7 and 9; METHOD.md section 7).

The critic V_phi(x_t, t, c) reads the noisy latent itself, so it can score a partial trajectory
without decoding or looking ahead. Methods, all on the policy's training sampler (the first S
steps stochastic, the rest deterministic; S = the critic's window, the states it was trained on):

  none       one sample per prompt (the unsteered policy)
  bon        best-of-N: N independent samples, keep the best by the reward (select='reward') or by
             the critic's value of the last window state (select='critic': no reward model needed);
             with terminal=True, of the last state the denoiser reads, x_{t_1}: after the window the
             image is already fixed (a critic trained there by train.py --critic-terminal is a learned
             reward on latents)
  smc        sequential Monte Carlo: N particles; at the first window state each is weighted by
             exp(lam V), at each later one (j = 1..S-1) its log-weight grows by lam * (V(x_j) - V(x_prev)),
             and (every resample_every steps) where the effective sample size falls below N/2 the
             particles are resampled systematically (weights reset); the best final one is returned;
             with terminal=True, x_{t_1} is weighted too and the choice is by V(x_{t_1})
  grad       critic-gradient guidance: each stochastic step's mean moves up the critic's gradient,
             mu' = mu + s * std^2 * grad_x V(x, t, c) (std: the step's Gaussian std)
  grad+bon   guidance inside each of N samples, then best-of-N
  proxy-smc  the same SMC with FK-steering's potential, the reward of the decoded clean-image
             prediction r(decode(x0_hat(x_t))) (arXiv 2501.06848): the baseline the critic must beat

Multi-reward: the critic has one head per reward; `weights` (R,) combines the heads at inference
without retraining. NFE accounting per final image: denoiser forward passes, critic forward and
backward passes, reward calls (decode + score), so methods compare at equal compute.

| symbol             | here                                  |
|--------------------|---------------------------------------|
| N                  | n (particles / samples per prompt)    |
| V(x_t, t, c)       | value(x, j): the weighted critic heads |
| lam, s             | lam, guidance                          |
| log w, ESS         | log_w (P, N), ess()                    |

Test: tests/test_steer.py
"""
from dataclasses import dataclass, field

import torch

import rollout
from rollout import randn_tensor

METHODS = ("none", "bon", "smc", "grad", "grad+bon", "proxy-smc")


def needs_critic(method, select):
    """Whether a method (with its best-of-N selection) reads the critic: smc and the gradient
    methods always, best-of-N when it selects by the critic's value."""
    return method in ("smc", "grad", "grad+bon") or (select == "critic" and method == "bon")


@dataclass
class Steered:
    """The result for P prompts with N samples each.
    images (P, 3, H, W): the chosen sample per prompt, latents (P, C, h, w) its final latent; candidates (P, N, 3, H, W): all final
    samples (for smc, the final particles); chosen (P,): the index of the chosen one; scores
    (P, N): what the choice was made on; nfe: per final image, {denoiser, critic_forward,
    critic_backward, reward}."""
    images: torch.Tensor
    latents: torch.Tensor
    candidates: torch.Tensor
    chosen: torch.Tensor
    scores: torch.Tensor
    nfe: dict = field(default_factory=dict)


def ess(log_w):
    """Effective sample size 1 / sum(w^2) of normalised weights, per row: (P, N) -> (P,)."""
    w = torch.softmax(log_w, dim=-1)
    return 1.0 / (w ** 2).sum(-1)


def systematic_resample(log_w, generator=None):
    """Systematic resampling, per row: (P, N) log-weights -> (P, N) ancestor indices. One uniform
    u per row; the N points (u + i) / N fall into the weights' cumulative sum, so particle i is
    copied between floor(N w_i) and ceil(N w_i) times (expectation N w_i, minimal variance)."""
    P, N = log_w.shape
    w = torch.softmax(log_w.double(), dim=-1)
    u = torch.rand(P, 1, generator=generator, dtype=torch.float64, device=log_w.device)
    points = (u + torch.arange(N, dtype=torch.float64, device=log_w.device)) / N           # (P, N)
    cdf = w.cumsum(-1)
    cdf[:, -1] = 1.0                                      # no rounding past the last particle
    return torch.searchsorted(cdf, points).clamp(max=N - 1)


def critic_value_fn(critic, critic_backbone, prompts, schedule, weights):
    """value(x, j, idx) -> (len(idx),): the weighted critic heads at step j's timestep for the
    states x of the prompts prompts[idx], the conditioning encoded once by the critic's backbone
    (which carries the base weights the critic was trained on, not the policy's)."""
    cond = critic_backbone.encode(prompts)
    w = torch.as_tensor(weights, dtype=torch.float32, device=critic_backbone.device)

    def value(x, j, idx):
        t = schedule.timesteps[torch.full((len(x),), j, dtype=torch.long)]
        return critic(critic_backbone, x, t, cond.index(idx)) @ w
    return value


@torch.no_grad()
def steer(backbone, prompts, method="none", n=4, num_steps=10, noise_level=0.7, sde_steps=5, value=None,
          score=None, select="critic", guidance=1.0, lam=4.0, resample_every=1, generator=None, net=None,
          terminal=False):
    """Sample len(prompts) = P final images with one of METHODS (module docstring).
    value(x, j, idx): the critic's (weighted) value of states x at step j for prompts[idx] (see
    critic_value_fn); score(images, idx) -> (len(idx),): the reward of final or predicted images.
    terminal: the critic also values x_{t_1}, the last state, after the window (needs S < K).
    Returns a Steered."""
    assert method in METHODS, method
    P, K = len(prompts), num_steps
    S = min(sde_steps or K, K)
    assert not terminal or S < K, "terminal=True needs a state after the window (sde_steps < num_steps)"
    last = K - 1 if terminal else S - 1    # the state the critic's final choice reads
    end = last if method == "smc" else S - 1   # the last state SMC weights (the proxy: its window only)
    N = 1 if method in ("none", "grad") else n
    if needs_critic(method, select) and value is None:
        raise ValueError(f"--steer {method} (select {select}) needs a critic")
    if (method == "proxy-smc" or (select == "reward" and N > 1)) and score is None:
        raise ValueError(f"--steer {method} (select {select}) needs a reward")
    idx = torch.arange(P).repeat_interleave(N)                        # (P*N,) prompt of each particle
    cond = backbone.encode([prompts[i] for i in idx])
    schedule = backbone.schedule(K)
    x = randn_tensor((P * N, *backbone.latent_shape), generator=generator, device=backbone.device,
                     dtype=backbone.dtype).float()
    if backbone.sampler == "ddim":
        x = x * backbone.scheduler.init_noise_sigma
    nfe = {"denoiser": 0, "critic_forward": 0, "critic_backward": 0, "reward": 0}
    smc = method in ("smc", "proxy-smc")
    log_w = torch.zeros(P, N, device=x.device)
    potential = last_value = None
    for j in range(K):
        jj = torch.full((P * N,), j, dtype=torch.long)
        stochastic = j < S
        grad = None
        if method in ("grad", "grad+bon") and stochastic:
            with torch.enable_grad():
                x_req = x.detach().requires_grad_(True)
                grad = torch.autograd.grad(value(x_req, j, idx).sum(), x_req)[0]
            nfe["critic_forward"] += P * N
            nfe["critic_backward"] += P * N
        x_next, _, mu, std, pred_x0 = rollout.step(backbone, x, jj, cond, schedule,
                                                  noise_level if stochastic else 0.0, generator=generator, net=net)
        nfe["denoiser"] += P * N
        if grad is not None:               # mu' = mu + s std^2 grad V: the sample moves with its mean
            x_next = x_next + guidance * std.view(-1, 1, 1, 1) ** 2 * grad
        if smc and (j < S or j == end):    # weight the current states x_j by their potential
            if method == "smc":
                g = value(x, j, idx)
                nfe["critic_forward"] += P * N
            else:
                g = score(backbone.decode(pred_x0), idx)
                nfe["reward"] += P * N
            g = g.view(P, N).float()
            # the first window state is weighted by exp(lam V) itself, each later one by the change
            # exp(lam (V(x_j) - V(x_prev))): the product telescopes to exp(lam V(current state))
            log_w = log_w + lam * (g - (potential if potential is not None else 0.0))
            potential = g
            if j >= 1 and (j % resample_every == 0 or j == S - 1 or j == end):
                resample = ess(log_w) < N / 2                              # (P,)
                if resample.any():
                    same = generator is not None and generator.device == log_w.device
                    anc = systematic_resample(log_w, generator if same else None)   # (P, N)
                    anc = torch.where(resample[:, None], anc, torch.arange(N, device=anc.device))
                    flat = (anc + torch.arange(P, device=anc.device)[:, None] * N).flatten()
                    x_next, potential = x_next[flat], potential.gather(1, anc)
                    log_w = torch.where(resample[:, None], torch.zeros_like(log_w), log_w)
            if j == end:
                last_value = potential
        elif select == "critic" and N > 1 and j == last and method != "proxy-smc":
            last_value = value(x, j, idx).view(P, N).float()              # the last window state, or x_{t_1}
            nfe["critic_forward"] += P * N
        x = x_next
    images = backbone.decode(x).float()                                   # (P*N, 3, H, W)
    if N == 1:
        scores = torch.zeros(P, 1)
    elif select == "reward":
        scores = score(images, idx).view(P, N).float().cpu()
        nfe["reward"] += P * N
    else:
        scores = last_value.cpu() + (log_w.cpu() / lam if smc else 0)     # smc: the value, plus pending weight
    chosen = scores.argmax(-1)                                            # (P,)
    candidates = images.view(P, N, *images.shape[1:]).cpu()
    latents = x.view(P, N, *x.shape[1:]).cpu()[torch.arange(P), chosen]
    return Steered(images=candidates[torch.arange(P), chosen], latents=latents, candidates=candidates, chosen=chosen,
                   scores=scores,
                   nfe={k: v / P for k, v in nfe.items()})


def expected_nfe(method, n, num_steps, sde_steps, select="critic", terminal=False):
    """The hand count of steer()'s NFE per final image, for tests and the benchmark's columns."""
    N = 1 if method in ("none", "grad") else n
    S = min(sde_steps, num_steps)
    out = {"denoiser": N * num_steps, "critic_forward": 0, "critic_backward": 0, "reward": 0}
    if method in ("grad", "grad+bon"):
        out["critic_forward"] = out["critic_backward"] = N * S
    if method == "smc":
        out["critic_forward"] = N * (S + 1 if terminal else S)
    if method == "proxy-smc":
        out["reward"] = N * S
    if N > 1 and select == "reward":
        out["reward"] += N
    elif N > 1 and select == "critic" and method not in ("smc", "proxy-smc"):
        out["critic_forward"] += N
    return out

