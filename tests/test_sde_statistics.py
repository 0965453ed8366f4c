"""The stochastic steps of rollout.py sample the right distribution (METHOD.md 2a, 2b).

For data x0 ~ N(m, s^2) (per element) the exact denoiser is analytic, so sampling with it
through our SDE / DDIM-eta step must return the data's mean and variance, up to Monte Carlo
error and a small discretisation error. A wrong drift or std term (the classic bugs) moves
the variance by far more than that: test_a_wrong_drift_is_caught shows it.
"""
import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

import models
import rollout
from models import Cond

M, S = 0.5, 0.5            # data mean and std


class Analytic:
    """A stand-in backbone whose denoiser is the exact posterior of Gaussian data."""
    device, dtype = torch.device("cpu"), torch.float32
    latent_shape = (1, 64, 64)
    schedule = models.Backbone.schedule          # the real grid, from a real diffusers scheduler

    def __init__(self, sampler):
        self.sampler = sampler
        if sampler == "flow":
            self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        else:
            self.scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                           clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")

    def encode(self, prompts):
        z = torch.zeros(len(prompts), 1)
        return Cond({"c": z}, {"c": z})

    def decode(self, x0):
        return x0

    def predict(self, x, t, cond, cfg_scale=1.0, net=None):
        t = t.to(x.dtype).view(-1, 1, 1, 1)
        if self.sampler == "flow":                  # x = (1 - sigma) x0 + sigma eps, v = eps - x0
            sigma = t / 1000
            var = (1 - sigma) ** 2 * S ** 2 + sigma ** 2
            r = x - (1 - sigma) * M
            return sigma / var * r - (M + (1 - sigma) * S ** 2 / var * r)
        abar = self.scheduler.alphas_cumprod[t.long().flatten()].view(-1, 1, 1, 1)
        var = abar * S ** 2 + 1 - abar              # x = sqrt(abar) x0 + sqrt(1 - abar) eps
        return (1 - abar).sqrt() / var * (x - abar.sqrt() * M)


def final_samples(sampler, noise_level, steps):
    g = torch.Generator().manual_seed(0)
    return rollout.sample(Analytic(sampler), ["x"] * 8, steps, noise_level, generator=g).latents[:, -1].flatten()


# DDIM with eta = 1 takes the posterior q(x_prev | x_t, x0_hat), whose variance is exact
# only in the many-step limit (it under-disperses by 0.03 at 50 steps): hence 200 steps.
@pytest.mark.parametrize("sampler,noise_level,steps", [("flow", 0.7, 50), ("flow", 0.0, 50),
                                                       ("ddim", 1.0, 200), ("ddim", 0.0, 50)])
def test_sampler_reproduces_gaussian_data(sampler, noise_level, steps):
    x0 = final_samples(sampler, noise_level, steps)
    n = x0.numel()                                             # 8 * 4096 samples
    # 5 Monte Carlo standard errors, plus 0.01 for the 50-step discretisation
    assert abs(x0.mean().item() - M) < 5 * S / math.sqrt(n) + 0.01
    assert abs(x0.var().item() - S ** 2) < 5 * S ** 2 * math.sqrt(2 / n) + 0.01


def test_a_wrong_drift_is_caught(monkeypatch):
    """Flow-GRPO's drift without its std^2 correction (a plain Euler step plus noise) inflates
    the variance: the check above must see it."""
    def euler_plus_noise(x, v, sigma, sigma_next, sigma_max, a):
        dsigma = sigma_next - sigma
        std_t = a * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma)))
        return x + v * dsigma.view(-1, 1, 1, 1), std_t * torch.sqrt(-dsigma)
    monkeypatch.setattr(rollout, "flow_sde_mean_std", euler_plus_noise)
    assert abs(final_samples("flow", 0.7, 50).var().item() - S ** 2) > 0.05


def test_a_wrong_ddim_direction_term_is_caught(monkeypatch):
    """DDIM's direction term with sqrt(1 - abar_prev) instead of sqrt(1 - abar_prev - std^2)
    adds noise twice over."""
    def double_noise(x, eps, abar, abar_prev, eta):
        b = lambda s: s.view(-1, 1, 1, 1)
        x0_hat = (x - b(torch.sqrt(1 - abar)) * eps) / b(torch.sqrt(abar))
        std_t = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        return b(torch.sqrt(abar_prev)) * x0_hat + b(torch.sqrt(1 - abar_prev)) * eps, std_t, x0_hat
    monkeypatch.setattr(rollout, "ddim_mean_std", double_noise)
    assert abs(final_samples("ddim", 1.0, 200).var().item() - S ** 2) > 0.05
