"""Latent trajectories with exact per-step log-probabilities (METHOD.md sections 1-2).

One stochastic sampler step is x_next = mu_theta(x, t) + std * z. Two families:
  2a. DDIM with eta > 0 (UNet, epsilon prediction; DDIM paper eqs. 12 and 16, as DDPO)
  2b. the flow-matching SDE (DiT, velocity prediction; Flow-GRPO's Euler-Maruyama step)
noise_level is eta for DDIM and `a` for the flow SDE; 0 gives the deterministic sampler
(DDIM / Euler ODE) used for evaluation. `step()` both samples a step (rollout) and, given
x_next, recomputes its log-probability (training): one function, so the PPO ratio is
exactly 1 before the first update (section 2c). Under mixed precision the denoiser runs in bf16 / fp16,
but its output is taken to fp32 before the step's mean, std and log-prob (Backbone.predict): the
ratio's every term is fp32 and computed by the same code at rollout and at recompute.

| paper (METHOD.md) | here |
|---|---|
| x_{t_K..t_0}; step k = K..1 (1) | Trajectory.latents (B, K+1, C, H, W); step index j = 0..K-1 is k = K - j |
| mu_theta, x0_hat (2a, 2b) | ddim_mean_std(), flow_sde_mean_std(); Trajectory.means, .pred_x0 (B, K, C, H, W) |
| eta (2a), noise a (2b) | noise_level; the training values in TRAIN_NOISE |
| the step's Gaussian std: std_t (2a), std * sqrt(-dsigma) (2b) | std (B,) from step(); Trajectory.stds (K,) |
| log pi_old of each step, mean over elements (2) | gaussian_log_prob(); Trajectory.log_probs (B, K) |
| log pi_theta, equal to it before an update (2c) | recompute_log_prob(): the rollout's own step() |
| not the paper's: the SDE window (9) | sde_steps: step_noise() is 0 after the first S steps |

Run:  python rollout.py --model tiny-dit --prompt "two red circles"   (saves a chain picture)
Test: tests/test_rollout.py, tests/test_gpu_paths.py (bf16)
"""
import math
import sys
from dataclasses import dataclass

import torch

import cli
from models import PRECISIONS, Cond, Schedule, check_precision, default_precision, load_backbone

# the training rollouts' noise by sampler: Flow-GRPO's SDE a = 0.7 (flow), DDPO's eta = 1 (DDIM)
TRAIN_NOISE = {"flow": 0.7, "ddim": 1.0}


def randn_tensor(*args, **kwargs):
    """diffusers' randn_tensor (its pipelines' noise, bit for bit), imported on first use: importing
    diffusers takes seconds that an entry point refusing a bad flag should not spend."""
    from diffusers.utils.torch_utils import randn_tensor as draw
    return draw(*args, **kwargs)


@dataclass
class Trajectory:
    """A batch of B rollouts of K steps. Step j = 0..K-1 is the paper's k = K - j.

    prompts     list[str] (B)
    cond        Cond: the text conditioning the policy saw
    latents     (B, K+1, C, H, W)  x_{t_K} .. x_{t_0}: states, then the final latent
    log_probs   (B, K)  log pi_old(x_{j+1} | x_j), mean over latent elements (0 where std = 0)
    means       (B, K, C, H, W)  mu_theta of each step
    pred_x0     (B, K, C, H, W)  the model's clean-latent prediction at each state
    stds        (K,)  each step's Gaussian std (0: a deterministic step, no policy gradient)
    timesteps   (K,)  what the denoiser was fed;  levels (K+1,): sigma (flow) / alpha-bar (ddim)
    images      (B, 3, H, W) in [0, 1]: decode(x_0)
    noise_level, cfg_scale, sde_steps: the sampler settings, which a recompute must reuse;
                only the first sde_steps steps are stochastic (None: all K), the rest are the
                deterministic sampler (Flow-GRPO-Fast / MixGRPO's SDE window, see sample())
    metas       list[dict] (B) or None: the prompts' metadata, for rewards that read it (the
                shapes checker), e.g. a critic that scores images itself (critic.OracleCritic)
    """
    prompts: list
    cond: Cond
    latents: torch.Tensor
    log_probs: torch.Tensor
    means: torch.Tensor
    pred_x0: torch.Tensor
    stds: torch.Tensor
    timesteps: torch.Tensor
    levels: torch.Tensor
    images: torch.Tensor
    noise_level: float
    cfg_scale: float
    sde_steps: int = None
    metas: list = None


def gaussian_log_prob(x_next, mu, std):
    """log N(x_next; mu, std^2), averaged over latent elements -> (B,).
    The mean over elements, not the sum, is what DDPO and Flow-GRPO use: it keeps log-ratios
    small (hence PPO clip ranges ~1e-4, not 0.2) and independent of the latent size."""
    std = std.view(-1, *[1] * (x_next.dim() - 1))
    log_prob = -((x_next.detach() - mu) ** 2) / (2 * std ** 2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return log_prob.mean(dim=tuple(range(1, x_next.dim())))


def flow_sde_mean_std(x, v, sigma, sigma_next, sigma_max, a):
    """METHOD.md 2b. x, v: (B, C, H, W); sigma, sigma_next: (B,). Returns mu and the
    step's Gaussian std (B,). At sigma = 1 the std's denominator uses sigma_max, the first
    sigma below 1, as Flow-GRPO does, since 1 - sigma = 0 there."""
    b = lambda s: s.view(-1, 1, 1, 1)
    dsigma = sigma_next - sigma                                           # < 0
    std_t = a * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma)))
    mu = (x * b(1 + std_t ** 2 * dsigma / (2 * sigma))
          + v * b((1 + std_t ** 2 * (1 - sigma) / (2 * sigma)) * dsigma))
    return mu, std_t * torch.sqrt(-dsigma)


def ddim_mean_std(x, eps, abar, abar_prev, eta):
    """METHOD.md 2a (DDIM eqs. 12, 16). x, eps: (B, C, H, W); abar, abar_prev: (B,)."""
    b = lambda s: s.view(-1, 1, 1, 1)
    x0_hat = (x - b(torch.sqrt(1 - abar)) * eps) / b(torch.sqrt(abar))
    std_t = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
    mu = b(torch.sqrt(abar_prev)) * x0_hat + b(torch.sqrt(1 - abar_prev - std_t ** 2)) * eps
    return mu, std_t, x0_hat


def step(backbone, x_t, j, cond, schedule, noise_level, cfg_scale=1.0, x_next=None, generator=None, net=None,
         noise=None):
    """One sampler step for states x_t (B, C, H, W) at step indices j (B,) (they may differ
    across the batch, as in a PPO minibatch). Samples x_next if it is None, else scores the
    given one. noise_level: a float, or (B,) per state (0 = a deterministic step). noise: the
    step's z (B, C, H, W) when the caller draws it (common random numbers), else drawn from generator.
    Returns x_next, log_prob (B,), mu, std (B,), pred_x0."""
    j = j.cpu()
    if torch.is_tensor(noise_level):
        noise_level = noise_level.to(x_t.device)
    t = schedule.timesteps[j]
    level, level_next = schedule.levels[j].to(x_t.device), schedule.levels[j + 1].to(x_t.device)
    pred = backbone.predict(x_t, t, cond, cfg_scale, net)                 # (B, C, H, W), fp32
    x = x_t.float()
    if backbone.sampler == "flow":
        sigma_max = schedule.levels[1].to(x_t.device)
        mu, std = flow_sde_mean_std(x, pred, level, level_next, sigma_max, noise_level)
        pred_x0 = x - level.view(-1, 1, 1, 1) * pred
    else:
        if backbone.scheduler.config.prediction_type == "v_prediction":   # v -> epsilon
            b = lambda s: s.view(-1, 1, 1, 1)
            pred = b(level.sqrt()) * pred + b((1 - level).sqrt()) * x
        mu, std, pred_x0 = ddim_mean_std(x, pred, level, level_next, noise_level)
    if x_next is None:
        x_next = mu
        if (std > 0).any():
            z = noise if noise is not None else randn_tensor(mu.shape, generator=generator, device=mu.device,
                                                             dtype=mu.dtype)
            x_next = mu + std.view(-1, 1, 1, 1) * z
    # a step with std = 0 is deterministic: no density, log_prob 0 and no policy gradient
    safe = torch.where(std > 0, std, torch.ones_like(std))
    log_prob = torch.where(std > 0, gaussian_log_prob(x_next.float(), mu, safe), torch.zeros_like(std))
    return x_next, log_prob, mu, std, pred_x0


def recompute_log_prob(backbone, traj, idx, j, net=None):
    """log pi_theta of recorded steps (trajectory indices idx (N,), step indices j (N,)) under
    the current weights: what the PPO ratio's numerator is. Same step() as the rollout."""
    schedule = Schedule(traj.timesteps, traj.levels)
    x_t, x_next = traj.latents[idx, j], traj.latents[idx, j + 1]
    _, log_prob, mu, std, _ = step(backbone, x_t, j, traj.cond.index(idx), schedule,
                                   step_noise(traj.noise_level, traj.sde_steps, j.cpu()), traj.cfg_scale,
                                   x_next=x_next, net=net)
    return log_prob, mu, std


def step_noise(noise_level, sde_steps, j):
    """The noise level of steps j (N,): noise_level inside the SDE window (the first sde_steps
    steps; None = every step), 0 after it."""
    if sde_steps is None:
        return noise_level
    return noise_level * (j < sde_steps).float()


@torch.no_grad()
def sample(backbone, prompts, num_steps, noise_level, cfg_scale=1.0, generator=None, net=None, cond=None,
           sde_steps=None, latents=None, metas=None):
    """Roll out len(prompts) trajectories of num_steps steps. The initial noise is drawn with
    diffusers' randn_tensor, exactly as its pipelines draw it, so a seeded generator gives the
    pipeline's own samples at noise_level = 0.
    sde_steps = S < num_steps: only the first S steps are stochastic (and trained), the rest
    deterministic (Flow-GRPO-Fast, MixGRPO). The early, noisy steps decide what is drawn where
    (the layout GenEval checks); the late ones only sharpen, and their tiny std (~1e-3 at the
    last flow step) gives the largest log-prob gradients, nearly all noise, so they are left out.
    latents: the initial noise x_{t_K} (B, C, H, W), as diffusers pipelines take it (e.g. shared
    by the samples of a group, as DanceGRPO does); None = drawn from generator. metas: the prompts'
    metadata, kept in the Trajectory."""
    cond = cond if cond is not None else backbone.encode(prompts)
    schedule = backbone.schedule(num_steps)
    B, K = len(prompts), num_steps
    if latents is None:
        latents = randn_tensor((B, *backbone.latent_shape), generator=generator, device=backbone.device,
                               dtype=backbone.dtype)
    x = latents.float()
    if backbone.sampler == "ddim":
        x = x * backbone.scheduler.init_noise_sigma
    latents, log_probs, means, pred_x0s, stds = [x], [], [], [], []
    for j in range(K):
        jj = torch.full((B,), j, dtype=torch.long)
        x, log_prob, mu, std, pred_x0 = step(backbone, x, jj, cond, schedule, step_noise(noise_level, sde_steps, jj),
                                             cfg_scale, generator=generator, net=net)
        latents.append(x), log_probs.append(log_prob), means.append(mu)
        pred_x0s.append(pred_x0), stds.append(std[0])
    return Trajectory(
        prompts=list(prompts), cond=cond,
        latents=torch.stack(latents, 1),          # (B, K+1, C, H, W)
        log_probs=torch.stack(log_probs, 1),      # (B, K)
        means=torch.stack(means, 1),              # (B, K, C, H, W)
        pred_x0=torch.stack(pred_x0s, 1),         # (B, K, C, H, W)
        stds=torch.stack(stds).cpu(),             # (K,)
        timesteps=schedule.timesteps, levels=schedule.levels,
        images=backbone.decode(x), noise_level=noise_level, cfg_scale=cfg_scale,
        sde_steps=sde_steps if sde_steps is not None and sde_steps < K else None, metas=metas)


def seeded_noise(backbone, prompts, seeds, batch=64):
    """The evaluation's units: (offset, prompts, x_T) for each seed and each chunk of `batch` prompts,
    in seed-major order (offset: the chunk's first image among the S*P). A fresh generator per seed,
    so an image depends on its seed and its place in prompts, not on the other seeds asked for. x_T
    is what sample() would draw itself: drawn for every unit, whether or not it is then sampled, so a
    rank that samples some units (eval.heldout_metrics) makes the images one process makes."""
    for s, seed in enumerate(seeds):
        g = torch.Generator(backbone.device).manual_seed(seed)
        for i in range(0, len(prompts), batch):
            part = prompts[i:i + batch]
            yield s * len(prompts) + i, part, randn_tensor((len(part), *backbone.latent_shape), generator=g,
                                                           device=backbone.device, dtype=backbone.dtype)


@torch.no_grad()
def sample_seeded(backbone, prompts, seeds, num_steps, batch=64, net=None):
    """The deterministic sampler's images of prompts x seeds, for evaluation (seeded_noise's units).
    (S*P, 3, H, W) on the CPU, seed-major."""
    return torch.cat([sample(backbone, part, num_steps, 0.0, net=net, latents=x_T).images.cpu()
                      for _, part, x_T in seeded_noise(backbone, prompts, seeds, batch)])


def chain_picture(backbone, traj, i=0):
    """(2*(K+1), 3, H, W): row 1 the noisy states x_t (decoded as they are) then x_0, row 2 the
    model's clean predictions x0-hat at each state then the final image."""
    with torch.no_grad():
        states = backbone.decode(traj.latents[i])                         # (K+1, 3, H, W)
        preds = backbone.decode(traj.pred_x0[i])                          # (K, 3, H, W)
    return torch.cat([states, preds, traj.images[i:i + 1].cpu()])


def main(argv=None):
    p = cli.Parser(description=__doc__.splitlines()[0])
    # model
    p.add_argument("--model", default="tiny-dit", help="tiny-dit | tiny-unet | sd1.5 | sd3.5m | a diffusers directory")
    p.add_argument("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device")
    p.add_argument("--mixed-precision", choices=tuple(PRECISIONS), default=None,
                   help="dtype of the weights: bf16 | fp16 | no (fp32); log-probs are fp32 either way (default: bf16 "
                        "on CUDA, no on CPU)")
    # sampling
    p.add_argument("--prompt", default="two red circles", help="the prompt to roll out")
    p.add_argument("--steps", type=cli.integer(1), default=10, help="denoising steps K")
    p.add_argument("--noise-level", type=cli.finite_float(min=0, max=1), default=None,
                   help="SDE noise a (flow, default 0.7) or DDIM eta (default 1.0); 0 = deterministic")
    p.add_argument("--cfg", type=cli.finite_float(min=1), default=1.0,
                   help="classifier-free guidance scale w: 1 = off (the conditional prediction alone), w > 1 = "
                        "uncond + w (cond - uncond); below 1 is not guidance")
    p.add_argument("--seed", type=cli.SEED, default=0, help="seed of the initial noise and the step noise")
    # output
    p.add_argument("--out", type=cli.output_file(".png", ".jpg", ".jpeg"), default="trajectory.png",
                   help="where to save the chain picture (PNG or JPEG)")
    args = p.parse_args(argv)
    precision = args.mixed_precision or default_precision(args.device)
    if check_precision(precision, args.device):
        p.exit(2, f"error: {check_precision(precision, args.device)}\n")
    try:
        backbone = load_backbone(args.model, args.device, PRECISIONS[precision])
    except cli.InputError as e:
        p.exit(2, f"error: {e}\n")
    noise = args.noise_level if args.noise_level is not None else TRAIN_NOISE[backbone.sampler]
    g = torch.Generator(args.device).manual_seed(args.seed)
    traj = sample(backbone, [args.prompt], args.steps, noise, args.cfg, generator=g)
    import grid
    levels = ["sigma" if backbone.sampler == "flow" else "abar"] * (args.steps + 1)
    titles = [f"k={args.steps - j} {name}={lvl:.2f}" for j, (name, lvl) in enumerate(zip(levels, traj.levels.tolist()))]
    grid.save_grid(args.out, chain_picture(backbone, traj), args.steps + 1, titles=titles[:-1] + ["x_0"],
                   row_titles=["x_t", "x0-hat"], heading=f"{args.prompt!r} ({backbone.name}, noise level {noise})")
    print(f"saved {args.out}: top row x_t from noise to x_0, bottom row the predicted clean image at each step "
          f"(sampler {backbone.sampler}, noise level {noise}, mean log-prob {traj.log_probs.mean():.3f})")


if __name__ == "__main__":
    sys.exit(main())
