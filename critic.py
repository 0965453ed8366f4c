"""The critic V_phi(x_t, t, c): the diffusion model as its own value function on noisy latents
(arXiv 2605.27736; METHOD.md section 3).

  backbone  a copy of the pretrained denoiser (tiny models: a full copy, all weights trained;
            large ones: a LoRA adapter named 'critic' on the same frozen base that carries the
            policy's 'policy' adapter: one base in memory, not three)
  features  its last hidden tokens before the output projection, and its timestep embedding
            (models.Backbone.features)
  head      a learned query attends over the tokens, then an MLP gives one value per reward;
            both norms are modulated AdaLN-style by the timestep embedding (the paper's first
            stabiliser: the head knows how noisy the state is); the last layer starts at zero,
            so V = 0 exactly at initialisation. With text=True (train.py --critic-text) the query
            also attends over the prompt's text tokens, projected to the tokens' width: the
            richer inputs that the paper's attention layer admits (its Fig. 10), which help the
            critic on prompts it never trained on (BENCHMARKS.md, critic fit). With proxy=True
            (train.py --critic-proxy-input) it also reads r(decode(x0_hat(x_t))), the reward of the
            denoiser's clean-image prediction, through a gain per noise level: V = head + g(t) r.
            A latent head learns little of the return along the SDE window from the few thousand
            states a run sees (bench/value_ceiling.py: at 10:10 its values add variance at every
            window state); the proxy hands it the reward's own reading of the state, and the head
            learns its scale per step and the rest. (On SD3 temb also carries the pooled prompt, so
            the gain is per noise level and prompt.)
Value pretraining (the second stabiliser, `train.py --value-warmup W`) lives in train.py.

| paper (METHOD.md 3, 5) | here |
|---|---|
| V_phi(x_t, t, c) | Critic.forward(backbone, x_t, t, cond[, proxy]) -> (B, R), one column per reward (section 6) |
| AdaLN noise-level conditioning | ValueHead.adaLN_modulation, modulate() |
| L_value = mean (V_phi(s) - G)^2 | value_loss(), regress(): the one fitting loss of ppo.update and fit() |
| explained variance, by noise level (8) | explained_variance(), explained_variance_by_noise() |

References
  1. DiT (facebookresearch/DiT, models.py): adaLN modulation, zero-initialised new layers.
  2. CleanRL (ppo_continuous_action.py): explained variance as the critic's health metric.

Run:   python critic.py --model tiny-dit [--reward jpeg]   (fits a critic to rollouts of the base
       model and prints its explained variance per noise level, from pure noise to clean)
Test:  tests/test_critic.py
"""
import contextlib
import copy
import itertools
import sys
import warnings
import weakref

import torch
import torch.nn as nn

import cli
import rollout
from models import Schedule, load_backbone

POLICY, CRITIC = "policy", "critic"           # adapter names on a shared LoRA base


def modulate(x, shift, scale):
    """DiT's adaLN: a norm's output, shifted and scaled per sample."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class ValueHead(nn.Module):
    """(tokens (B, N, D), temb (B, E)[, text (B, L, T)][, proxy (B, R)]) -> values (B, R): one learned
    query token attends over the feature tokens (and, with text_dim = T, over the L text tokens of the
    prompt, projected to width D), then an MLP to R outputs, one per reward (section 6); with
    proxy=True, plus g(temb) * proxy, the proxy's reading scaled per noise level."""

    def __init__(self, dim, temb_dim, num_rewards=1, text_dim=None, adaln=True, proxy=False):
        super().__init__()
        self.text_proj = nn.Linear(text_dim, dim) if text_dim else None
        num_heads = max(1, dim // 64) if dim % max(1, dim // 64) == 0 else 1
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.norm_tokens = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_pooled = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        # adaln=False: the ablation of the paper's first stabiliser (train.py --critic-adaln off): plain norms,
        # the head then learns the noise level only from what the tokens themselves show of it
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(temb_dim, 4 * dim)) if adaln else None
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, num_rewards))
        # DiT's initialisation: modulation starts as the identity, and the last layer at zero,
        # so V_phi = 0 exactly at the start and the first updates do not fight a random output
        if adaln:
            nn.init.zeros_(self.adaLN_modulation[-1].weight), nn.init.zeros_(self.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.mlp[-1].weight), nn.init.zeros_(self.mlp[-1].bias)
        # the proxy's gain per noise level, zero at the start like the MLP's output (V = 0 still)
        self.proxy_gain = nn.Sequential(nn.SiLU(), nn.Linear(temb_dim, num_rewards)) if proxy else None
        if proxy:
            nn.init.zeros_(self.proxy_gain[-1].weight), nn.init.zeros_(self.proxy_gain[-1].bias)

    def forward(self, tokens, temb, *extra):
        assert len(extra) == (self.text_proj is not None) + (self.proxy_gain is not None), "extra: [text][, proxy]"
        text = extra[0] if self.text_proj is not None else None      # extra: [text (B, L, T)][, proxy (B, R)]
        proxy = extra[-1] if self.proxy_gain is not None else None
        if self.text_proj is not None:      # the prompt's tokens join the image's as keys and values
            tokens = torch.cat([tokens, self.text_proj(text)], 1)                           # (B, N + L, D)
        if self.adaLN_modulation is None:
            mod = torch.zeros(len(tokens), 4 * tokens.shape[-1], device=tokens.device)    # (B, 4D): no modulation
        else:
            mod = self.adaLN_modulation(temb)                                              # (B, 4D)
        shift_t, scale_t, shift_p, scale_p = mod.chunk(4, dim=-1)                         # 4 x (B, D)
        h = modulate(self.norm_tokens(tokens), shift_t, scale_t)                          # (B, N, D)
        pooled = self.attn(self.query.expand(len(h), -1, -1), h, h, need_weights=False)[0]  # (B, 1, D)
        pooled = modulate(self.norm_pooled(pooled), shift_p, scale_p)[:, 0]               # (B, D)
        if proxy is None:
            return self.mlp(pooled)                                                       # (B, R)
        return self.mlp(pooled) + self.proxy_gain(temb) * proxy                           # (B, R)


def feature_dims(backbone):
    """(D, E, T): width of the last hidden tokens and of the timestep embedding, read from the
    very modules whose inputs Backbone.features hooks, and of the text tokens the denoiser reads
    (cond's encoder_hidden_states)."""
    net = backbone.net
    if backbone.sampler == "flow":                       # SD3 transformer: norm_out(tokens, temb)
        return net.norm_out.linear.in_features, net.norm_out.linear.in_features, net.config.joint_attention_dim
    return (net.conv_norm_out.num_channels, net.time_embedding.linear_2.out_features,   # UNet
            net.config.cross_attention_dim)


# ----------------------------------------------------------------------------- LoRA adapters

def lora_config(backbone, rank=32, alpha=64):
    """LoRA on the attention projections (the peers' choice for SD3 and SD1.5)."""
    from peft import LoraConfig
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    if backbone.sampler == "flow":                   # SD3's joint attention: the text stream too
        targets += ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)


def adapter_params(net, name):
    return [p for n, p in net.named_parameters() if f".{name}." in n and "lora_" in n]


@contextlib.contextmanager
def adapter(net, name):
    """Run the shared base with one adapter active (name), or none (name=None: the frozen base,
    i.e. the KL reference); the previously active adapter is restored on exit. peft's
    set_adapter also flips requires_grad on the adapters; both adapters are always being
    trained, so their flags are put back."""
    if not getattr(net, "_hf_peft_config_loaded", False):
        yield net
        return
    trainable = [p for n, p in net.named_parameters() if "lora_" in n]
    previous = net.active_adapters()
    if name is None:
        net.disable_adapters()
    elif previous != [name]:
        net.set_adapter(name)
    try:
        yield net
    finally:
        if name is None:
            net.enable_adapters()
        elif previous != [name]:
            net.set_adapter(previous)
        for p in trainable:
            p.requires_grad_(True)


# ----------------------------------------------------------------------------- the critic

class Critic(nn.Module):
    """V_phi(x_t, t, c) -> (B, R). `lora=False`: a full trainable copy of backbone.net;
    `lora=True`: a 'critic' LoRA adapter added to backbone.net itself (not registered as a
    submodule here, so state_dict() holds only what is trained: head and, for a copy, the net).
    `text=True`: the head also reads the prompt's text tokens; `adaln=False`: its norms are not
    modulated by the noise level (an ablation); `score` (as ProxyCritic's): the head also reads the
    proxy r(decode(x0_hat)) of each state, x0_hat the policy's prediction kept in the Trajectory."""
    learned = True                                  # trained by ppo.update, saved in checkpoints
    cost = {}                                       # what values() spent beyond its passes (the proxy's reward calls)

    def __init__(self, backbone, num_rewards=1, lora=False, rank=32, alpha=64, text=False, adaln=True, score=None):
        super().__init__()
        self.lora, self.text, self.score = lora, text, score
        self._kept_proxy = None                     # values()'s proxies: (traj weakref, column of step j (K,), (B, F, R))
        if lora:
            with warnings.catch_warnings():          # peft warns that a second adapter is a second adapter
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                backbone.net.add_adapter(lora_config(backbone, rank, alpha), adapter_name=CRITIC)
            self._shared = [backbone.net]                # a list hides it from nn.Module
        else:
            self.net = copy.deepcopy(backbone.net).requires_grad_(True)   # eval mode kept: no dropout
        D, E, T = feature_dims(backbone)
        self.head = ValueHead(D, E, num_rewards, T if text else None, adaln=adaln, proxy=score is not None)

    @property
    def backbone_net(self):
        return self._shared[0] if self.lora else self.net

    def trainable_parameters(self):
        return self.backbone_parameters() + list(self.head.parameters())

    def backbone_parameters(self):
        return adapter_params(self.backbone_net, CRITIC) if self.lora else list(self.net.parameters())

    def param_groups(self, lr, head_lr):
        """The new head learns faster than the pretrained backbone it reads, which should change slowly."""
        return [{"params": self.backbone_parameters(), "lr": lr}, {"params": list(self.head.parameters()), "lr": head_lr}]

    def features(self, backbone, x_t, t, cond, proxy=None):
        """The head's inputs: tokens (B, N, D) and timestep embedding (B, E) of the critic's backbone,
        with text=True the prompt's text tokens (B, L, T) as the denoiser reads them, and with a score
        the proxy (B, R) (Critic.proxy)."""
        with adapter(self.backbone_net, CRITIC) as net:
            tokens, temb = backbone.features(x_t, t, cond, net=net)
        out = (tokens.float(), temb.float())
        if self.text:
            out += (cond.cond["encoder_hidden_states"].float(),)
        if self.score is not None:
            if proxy is None:
                raise ValueError("this critic reads the proxy r(x0_hat): pass proxy=Critic.proxy(...)")
            out += (proxy.to(tokens.device).float(),)
        return out

    def forward(self, backbone, x_t, t, cond, proxy=None):
        """x_t (B, C, H, W), t (B,) the denoiser's timesteps, cond a Cond of B prompts -> (B, R);
        proxy (B, R): with a score, the proxy of those states (Critic.proxy)."""
        return self.head(*self.features(backbone, x_t, t, cond, proxy))

    @torch.no_grad()
    def proxy(self, backbone, traj, idx, j, chunk=256):
        """The proxy reward r(decode(x0_hat)) (N, R) of the states (idx, j) (N,) of traj, or None
        without a score: what the head reads beside the latents (ProxyCritic's values). It depends on
        traj alone, so values() keeps those of the trajectory it last read and ppo.update's regress on
        its states reads them back rather than decoding and scoring each state once more per pass."""
        if self.score is None:
            return None
        kept = self._kept_proxy
        if kept is not None and kept[0]() is traj and bool((kept[1][j] >= 0).all()):
            return kept[2][idx, kept[1][j]]
        return score_latents(backbone, self.score, traj.pred_x0[idx, j], traj, idx, chunk)

    @torch.no_grad()
    def values(self, backbone, traj, chunk=64, keep_features=False, steps=None, last=False, rewards=None):
        """V_k of the states x_{t_K} .. x_{t_1} of a Trajectory, batched: (B, K, R); with steps=S,
        of the first S states only (B, S, R): those of its SDE window, the ones trained; last=True
        appends x_{t_1}, the last state the denoiser reads (B, S + 1, R): after the window its return
        is fixed (train.py --critic-terminal).
        The final latent x_0 is terminal: its value is 0 by definition (section 4), not computed.
        keep_features=True also returns the head's inputs (Critic.features) for the B*F states (row
        b*F + f), so the head can be trained on every state without another backbone pass.
        rewards: the batch's rewards (B, R), which only the fitted proxy reads (its lines' data)."""
        B, K = traj.log_probs.shape
        cols = list(range(steps or K)) + ([K - 1] if last else [])           # the F states' step indices
        F = len(cols)
        self.cost = {"critic/reward_calls": B * F} if self.score is not None else {}
        idx, col = torch.meshgrid(torch.arange(B), torch.arange(F), indexing="ij")
        idx, j = idx.flatten(), torch.tensor(cols)[col.flatten()]            # (B*F,)
        proxy = self.proxy(backbone, traj, idx, j, chunk)                   # (B*F, R) or None
        if proxy is not None:
            column = torch.full((K,), -1, dtype=torch.long)
            column[torch.tensor(cols)] = torch.arange(F)
            self._kept_proxy = (weakref.ref(traj), column, proxy.view(B, F, -1))
        values, inputs = [], []
        for s in range(0, B * F, chunk):
            rows, js = idx[s:s + chunk], j[s:s + chunk]
            f = self.features(backbone, traj.latents[rows, js], traj.timesteps[js], traj.cond.index(rows),
                              None if proxy is None else proxy[s:s + chunk])
            values.append(self.head(*f))
            if keep_features:
                inputs.append(f)
        values = torch.cat(values).view(B, F, -1)
        if not keep_features:
            return values
        return values, tuple(torch.cat(t) for t in zip(*inputs))   # (B*F, N, D), (B*F, E)[, (B*F, L, T)][, (B*F, R)]

    def state_dict_to_save(self):
        """What a checkpoint holds: the head, plus the copy's weights or the critic adapter."""
        out = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        if self.lora:
            from peft import get_peft_model_state_dict
            out.update({f"lora.{k}": v for k, v in
                        get_peft_model_state_dict(self.backbone_net, adapter_name=CRITIC).items()})
        else:
            out.update({f"net.{k}": v for k, v in self.net.state_dict().items()})
        return {k: v.detach().contiguous() for k, v in out.items()}

    def load_saved(self, state):
        self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        if self.lora:
            from peft import set_peft_model_state_dict
            set_peft_model_state_dict(self.backbone_net, {k[5:]: v for k, v in state.items() if k.startswith("lora.")},
                                      adapter_name=CRITIC)
        else:
            self.net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})


def check_loadable(config, run_dir):
    """An InputError unless the run (its config.json read into config) has a critic load() can rebuild on its
    own: a learned one that does not read the proxy, whose values need the policy's x0_hat and the reward at
    each state. eval.py asks before it loads any model."""
    if config.get("critic", "learned") != "learned":
        raise cli.InputError(f"{run_dir} trained with --critic {config['critic']}: it has no learned critic to load")
    if config.get("critic_proxy_input"):
        raise cli.InputError(f"{run_dir} trained with --critic-proxy-input: its critic reads r(x0_hat), which a "
                             "loaded critic is not given (steering, bench/critic_health.py); use a run trained without it")


def load(backbone, run_dir):
    """The trained critic of a train.py run (its config.json and checkpoint/critic.safetensors),
    e.g. for steering. With LoRA, this adds the 'critic' adapter to backbone.net."""
    import json
    import os
    from safetensors.torch import load_file
    config = json.load(open(os.path.join(run_dir, "config.json")))
    check_loadable(config, run_dir)
    names = [n for n in config["rewards"].split(",") if n.strip()]
    rank = config.get("lora_rank") or 0
    critic = Critic(backbone, len(names), lora=bool(rank), rank=rank or 32, alpha=config.get("lora_alpha") or 64,
                    text=bool(config.get("critic_text")), adaln=config.get("critic_adaln", "on") == "on")
    critic.load_saved(load_file(os.path.join(run_dir, "checkpoint", "critic.safetensors")))
    return critic.to(backbone.device)


# ----------------------------------------------------------------------------- the controls
# The critics without a network, for the ablations a reader of the paper asks for (train.py --critic):
# none, the proxy, the proxy with a line fitted per step, the oracle. Each answers Critic.values' call
# with (B, F, R) in the units of the normalised rewards, so GAE and the PPO update are the same code
# for every kind; none of them has parameters for the optimiser.

KINDS = ("learned", "none", "proxy", "proxy-fit", "oracle")


class NoCritic:
    """V = 0 (train.py --critic none): with gamma = lambda = 1 every step of a trajectory gets the same
    advantage, its normalised return: REINFORCE with the batch-normalised return as baseline."""
    learned = False

    def __init__(self, num_rewards=1):
        self.num_rewards, self.cost = num_rewards, {}    # cost: what the last values() spent beyond the rollout

    def values(self, backbone, traj, steps=None, last=False, keep_features=False, rewards=None):
        B, K = traj.log_probs.shape
        return torch.zeros(B, (steps or K) + bool(last), self.num_rewards)


class ProxyCritic(NoCritic):
    """V(x_k) = the normalised reward of the decoded clean-image prediction at x_k,
    r(decode(x0_hat(x_k))) (train.py --critic proxy): the pixel-space critic of the paper's Fig. 2,
    the dense reward of SDPO and the potential of FK-steering (steer.py's proxy-smc). score(images,
    prompts, metas) -> (N, R) normalised rewards. One decode and reward call per state, no denoiser pass."""

    def __init__(self, num_rewards, score, chunk=256):
        super().__init__(num_rewards)
        self.score, self.chunk = score, chunk

    def values(self, backbone, traj, steps=None, last=False, keep_features=False, rewards=None):
        B, K = traj.log_probs.shape
        cols = list(range(steps or K)) + ([K - 1] if last else [])
        x0_hat = traj.pred_x0[:, cols].flatten(0, 1)                             # (B*F, C, h, w), row b*F + f
        rows = torch.arange(B).repeat_interleave(len(cols))                      # (B*F,) their trajectories
        self.cost = {"critic/reward_calls": len(rows)}
        return score_latents(backbone, self.score, x0_hat, traj, rows, self.chunk).view(B, len(cols), -1)


class FittedProxyCritic(ProxyCritic):
    """V(x_k) = a_k + b_k r(decode(x0_hat(x_k))) (train.py --critic proxy-fit): the proxy, calibrated
    per step. At noisy states the raw proxy is not on R's scale (its spread there is its own,
    unrelated to R), so R - r(x0_hat) can vary more than R itself (bench/value_ceiling.py); the best
    line through (r(x0_hat(x_k)), R) over the batch, one per step and reward, fixes scale and bias: a
    critic of two learned numbers per step, fitted afresh on every batch of the moving policy.
    Each trajectory's line is fitted on the batch's *other* trajectories (leave-one-out, RLOO's
    reason): its own return, which its actions caused, never enters its own baseline. rewards (B, R):
    the batch's normalised rewards; reduce sums the statistics over the global batch (train.py:
    ppo.all_reduce_sum), so every rank fits the same lines."""

    def __init__(self, num_rewards, score, reduce=None, chunk=256):
        super().__init__(num_rewards, score, chunk)
        self.reduce = reduce or (lambda t: t)

    def values(self, backbone, traj, steps=None, last=False, keep_features=False, rewards=None):
        if rewards is None:
            raise ValueError("--critic proxy-fit fits its lines to the batch's rewards: values(..., rewards=...)")
        return loo_line(super().values(backbone, traj, steps, last), rewards, self.reduce)


def loo_line(x, rewards, reduce=lambda t: t):
    """x (B, F, R) a predictor at each of F states, rewards (B, R) -> (B, F, R): for row b, the least-
    squares line of the reward on x at that state and reward, fitted on every row but b (over the
    global batch: reduce sums the statistics across ranks), evaluated at x[b]."""
    x = x.double()
    y = rewards.detach().to(x.device, torch.float64)[:, None].expand_as(x)      # (B, F, R) the return, per state
    per_row = torch.stack([torch.ones_like(x), x, y, x * x, x * y])               # (5, B, F, R)
    total = reduce(per_row.sum(1))                                               # (5, F, R) over the global batch
    n, sx, sy, sxx, sxy = total[:, None] - per_row                               # each (B, F, R): all but row b
    n = n.clamp(min=1)
    mx, my = sx / n, sy / n
    var, cov = sxx / n - mx ** 2, sxy / n - mx * my
    slope = torch.where(var > 1e-12, cov / var.clamp(min=1e-12), torch.zeros_like(cov))  # no spread: the mean
    return (my + slope * (x - mx)).float()


class OracleCritic(NoCritic):
    """V(x_k) = the mean normalised reward of M fresh continuations of the current policy from x_k
    (train.py --critic oracle --oracle-continuations M): unbiased for V^pi(x_k), so it bounds what any
    critic can give. The continuations run the rollout's own sampler (its SDE window, then the
    deterministic tail) with the policy's weights, on common random numbers: continuation m of
    trajectory b takes the noise Z[m, b, j] at step j whichever state it started from, so V(x_k) and
    V(x_{k+1}) differ by what step k's own noise did (the actual step against Z[m, b, k]), not by the
    independent noise of every later step. Costs M partial rollouts per trained state (reported as
    critic/continuation_images, apart from the training images). score: as ProxyCritic's;
    generator: the run's rollout noise stream, so a resumed run draws the same continuations."""

    def __init__(self, num_rewards, score, policy_net, M, generator=None, chunk=256):
        super().__init__(num_rewards)
        self.score, self.policy_net, self.M, self.generator, self.chunk = score, policy_net, M, generator, chunk

    def values(self, backbone, traj, steps=None, last=False, keep_features=False, rewards=None):
        assert not last, "the oracle values the SDE window's states only (after it the return is fixed)"
        B, K = traj.log_probs.shape
        S, M = steps or K, self.M
        schedule = Schedule(traj.timesteps, traj.levels)
        Z = rollout.randn_tensor((M, B, S, *traj.latents.shape[2:]), generator=self.generator,
                                 device=traj.latents.device, dtype=traj.latents.dtype)     # (M, B, S, C, h, w)
        m, b, k = (t.flatten() for t in torch.meshgrid(torch.arange(M), torch.arange(B), torch.arange(S), indexing="ij"))
        x = traj.latents[b, k].clone()                       # (M*B*S, C, h, w): continuation (m, b) from state k
        passes = 0
        with adapter(self.policy_net, POLICY) as net:
            for j in range(K):                               # every continuation started by step j takes it
                live = (k <= j).nonzero().flatten()
                for rows in live.split(self.chunk):
                    jj = torch.full((len(rows),), j, dtype=torch.long)
                    x[rows] = rollout.step(backbone, x[rows], jj, traj.cond.index(b[rows]), schedule,
                                           rollout.step_noise(traj.noise_level, traj.sde_steps, jj), traj.cfg_scale,
                                           net=net, noise=Z[m[rows], b[rows], j] if j < S else None)[0]
                passes += len(live)
        self.cost = {"critic/continuation_images": M * B * S, "critic/continuation_denoiser_passes": passes}
        return score_latents(backbone, self.score, x, traj, b, self.chunk).view(M, B, S, -1).mean(0)   # (B, S, R)


def score_latents(backbone, score, latents, traj, rows, chunk):
    """score(decode(latents)) in chunks -> (N, R) on the CPU: latents (N, C, h, w) of the trajectories rows (N,)."""
    out = []
    for s in range(0, len(rows), chunk):
        r = rows[s:s + chunk].tolist()
        out.append(score(backbone.decode(latents[s:s + chunk]), [traj.prompts[i] for i in r],
                         [traj.metas[i] for i in r] if traj.metas else None).float().cpu())
    return torch.cat(out)


def build(kind, backbone, num_rewards=1, lora=False, rank=32, alpha=64, text=False, adaln=True, score=None,
          policy_net=None, continuations=8, generator=None, reduce=None, proxy_input=False):
    """One critic of KINDS by name: what train.py --critic chooses (proxy_input: the learned head also
    reads the proxy, --critic-proxy-input)."""
    if kind == "learned":
        if proxy_input and score is None:
            raise ValueError("proxy_input: the head reads the proxy, which needs the reward (score=...)")
        return Critic(backbone, num_rewards, lora=lora, rank=rank, alpha=alpha, text=text, adaln=adaln,
                      score=score if proxy_input else None).to(backbone.device)
    if kind == "none":
        return NoCritic(num_rewards)
    if kind == "proxy":
        return ProxyCritic(num_rewards, score)
    if kind == "proxy-fit":
        return FittedProxyCritic(num_rewards, score, reduce)
    return OracleCritic(num_rewards, score, policy_net, continuations, generator)


# ----------------------------------------------------------------------------- diagnostics

def noise_fraction(backbone, levels):
    """How much of a state is noise, on one scale for both samplers: sigma (flow) or
    sqrt(1 - alpha-bar) (ddim). 1 = pure noise, 0 = clean."""
    return levels if backbone.sampler == "flow" else (1 - levels).clamp(min=0).sqrt()


def explained_variance(y_pred, y_true):
    """1 - Var(y - y_pred) / Var(y): 1 is perfect, 0 is no better than the mean, < 0 is worse.
    NaN when the targets do not vary."""
    var_y = y_true.var()
    return (1 - (y_true - y_pred).var() / var_y).item() if var_y > 0 else float("nan")


BUCKETS = (1.0, 0.8, 0.6, 0.4, 0.2, 0.0)   # noise-fraction edges, from pure noise to clean


def explained_variance_by_noise(values, returns, noise):
    """values, returns (B, K) and the noise fraction of each state (K,) -> {"1.0-0.8": ev, ...},
    one entry per bucket of BUCKETS that holds any state."""
    out = {}
    for hi, lo in zip(BUCKETS[:-1], BUCKETS[1:]):
        cols = ((noise <= hi) & (noise > lo)) if lo > 0 else ((noise <= hi) & (noise >= lo))
        if cols.any():
            out[f"{hi:.1f}-{lo:.1f}"] = explained_variance(values[:, cols].flatten(), returns[:, cols].flatten())
    return out


def rollouts(backbone, pool, score, batch=32, steps=10, sde_steps=None, generator=None):
    """Fresh rollout batches without end, (Trajectory, R (B,)), of the model in backbone at its
    training noise, on prompts drawn uniformly from pool (metadata dicts) and scored by
    score(images, prompts, metadata) (a rewards.py scorer): what fit() takes."""
    noise_level = rollout.TRAIN_NOISE[backbone.sampler]
    while True:
        metas = [pool[i] for i in torch.randint(len(pool), (batch,), generator=generator)]
        prompts = [m["prompt"] for m in metas]
        traj = rollout.sample(backbone, prompts, steps, noise_level, generator=generator, sde_steps=sde_steps)
        yield traj, score(traj.images, prompts, metas)


def value_loss(new_values, returns, old_values=None, vf_clip=0.0):
    """L_value = 0.5 mean (V - G)^2, all (N, R) (METHOD.md 5); with vf_clip > 0, PPO's clipped version:
    the worse of the plain error and that of V_old + clip(V - V_old, -c, c), so V stays near V_old."""
    v_loss = (new_values - returns) ** 2
    if vf_clip > 0:
        v_clipped = old_values + torch.clamp(new_values - old_values, -vf_clip, vf_clip)
        v_loss = torch.max(v_loss, (v_clipped - returns) ** 2)
    return 0.5 * v_loss.mean()


def regress(critic, backbone, traj, idx, j, returns, old_values=None, vf_clip=0.0):
    """The one critic-fitting loss: value_loss of V_phi(x_{t_j}, t_j, c) at the states (idx, j) of traj
    against their targets G (N, R), in the units of rewards.RunningNorm. ppo.update's minibatches and
    fit() both regress through it."""
    values = critic(backbone, traj.latents[idx, j], traj.timesteps[j], traj.cond.index(idx),
                    critic.proxy(backbone, traj, idx, j))                                         # (N, R)
    return value_loss(values, returns, old_values, vf_clip)


def fit(backbone, critic, rollouts, lr=1e-4, head_lr=1e-3, minibatch=32, generator=None, progress=None):
    """Regress V_phi on Monte-Carlo returns (gamma = lambda = 1: every state's target is its
    trajectory's final reward R, G = R), one rollout batch at a time, each seen once: what train.py
    does with --critic-fraction 1 (backbone and head on every state of the batch), through the same
    loss (regress) on targets scaled the same way (rewards.RunningNorm, the mixer's statistics).
    rollouts: an iterable of (Trajectory, returns (B,)); only the states of the SDE window (the
    trained ones) are fitted. Returns the (mean, std) that standardised the targets: V_phi is in
    those units, R ~ V * std + mean."""
    from rewards import RunningNorm
    opt = torch.optim.AdamW(critic.param_groups(lr, head_lr), weight_decay=0.0)
    stats = RunningNorm(1)
    for traj, R in (progress or (lambda x: x))(rollouts):
        G = stats.normalise(R.float()[:, None])                                       # (B, 1), after adding R
        B, K = len(R), traj.sde_steps or traj.log_probs.shape[1]
        for mb in torch.randperm(B * K, generator=generator).split(minibatch):
            idx, j = mb // K, mb % K
            loss = regress(critic, backbone, traj, idx, j, G[idx])
            opt.zero_grad(set_to_none=True)
            with adapter(critic.backbone_net, CRITIC):    # checkpointed blocks re-run in backward: with this adapter
                loss.backward()
            nn.utils.clip_grad_norm_(critic.trainable_parameters(), 1.0)
            opt.step()
    return stats.mean[0].float(), stats.std()[0].float()


def main(argv=None):
    """Fit a critic to Monte-Carlo returns of the base model's rollouts on the built-in world and
    report its explained variance per noise level on fresh rollouts (the paper's premise)."""
    p = cli.Parser(description=main.__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-dit", help="tiny-dit | tiny-unet | a ShapesPipeline directory")
    p.add_argument("--reward", default="shapes", help="a reward of rewards.py: shapes (the world's checker), jpeg, ...")
    p.add_argument("--iters", type=cli.integer(1), default=30, help="rollout batches to fit on")
    p.add_argument("--batch", type=cli.integer(1), default=32, help="trajectories per batch")
    p.add_argument("--steps", type=cli.integer(1), default=10, help="denoising steps K")
    p.add_argument("--sde-steps", type=cli.integer(1), default=None,
                   help="stochastic (and fitted) steps S, the first of K (train.py's --sde-steps; default: all K)")
    p.add_argument("--lr", type=cli.finite_float(above=0), default=1e-4,
                   help="AdamW learning rate of the critic's backbone copy")
    p.add_argument("--head-lr", type=cli.finite_float(above=0), default=1e-3,
                   help="AdamW learning rate of the value head")
    p.add_argument("--minibatch", type=cli.integer(1), default=32, help="states per optimiser step")
    p.add_argument("--eval-batches", type=cli.integer(1), default=4,
                   help="fresh batches to measure explained variance on")
    p.add_argument("--seed", type=cli.SEED, default=0, help="seed")
    args = p.parse_args(argv)
    if args.sde_steps is not None and args.sde_steps > args.steps:
        p.exit(2, f"error: --sde-steps must be between 1 and --steps ({args.steps}), got {args.sde_steps}\n")
    import rewards
    from models import resolve
    try:
        if resolve(args.model)[1] != "ShapesPipeline":
            raise cli.InputError(f"--model {args.model}: critic.py fits on the built-in world only (tiny-dit, tiny-unet "
                                 "or a ShapesPipeline directory); train.py trains critics on real models")
        score = rewards.build_reward(args.reward)             # an unknown name, or weights offline: before the model
        backbone = load_backbone(args.model)
    except cli.InputError as e:
        p.exit(2, f"error: {e}\n")
    import toy
    torch.manual_seed(args.seed)
    critic = Critic(backbone, num_rewards=1)
    g = torch.Generator().manual_seed(args.seed)
    S = args.sde_steps or args.steps
    stream = rollouts(backbone, toy.prompts("train"), score, args.batch, args.steps, S, g)

    from tqdm import tqdm
    mean, std = fit(backbone, critic, itertools.islice(stream, args.iters), args.lr, args.head_lr, args.minibatch, g,
                    progress=lambda it: tqdm(it, total=args.iters, desc="fitting the critic"))
    trajs, returns = zip(*itertools.islice(stream, args.eval_batches))
    values = torch.cat([critic.values(backbone, t, steps=S)[..., 0] * std + mean for t in trajs])   # (N, S)
    returns = torch.cat(returns)[:, None].expand_as(values)                      # (N, S): every state's target is R
    noise = noise_fraction(backbone, trajs[0].levels[:S])                         # (S,)
    print(f"explained variance of V_phi ({args.reward}) on {len(values)} fresh rollouts, by noise fraction of "
          f"the state (1 = pure noise, 0 = clean; reward mean {returns[:, 0].mean():.3f}, std {returns[:, 0].std():.3f}):")
    for k in range(values.shape[1]):
        print(f"  step {k}: noise {noise[k]:.2f}  EV {explained_variance(values[:, k], returns[:, k]):+.3f}")
    for name, ev in explained_variance_by_noise(values, returns, noise).items():
        print(f"  bucket {name}: EV {ev:+.3f}")
    print(f"  overall: EV {explained_variance(values.flatten(), returns.flatten()):+.3f}")


if __name__ == "__main__":
    sys.exit(main())
