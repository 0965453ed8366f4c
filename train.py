"""Critic-guided RL post-training of a diffusion model (arXiv 2605.27736), and GRPO in the same
code: rollouts (rollout.py) -> rewards (rewards.py) -> values (critic.py) -> one PPO or GRPO
update (ppo.py), with value pretraining, logging, sample grids, checkpoints and exact resume.

Launch:
  python train.py                          # the built-in world: tiny-dit, shapes reward, critic-PPO, CPU
  python train.py --algo grpo              # the GRPO baseline on the same budget
  python train.py --resume runs/NAME       # continue a run exactly where it stopped (or rerun its own
                                           # command, with --run-dir: how a requeued job continues)
  torchrun --standalone --nproc_per_node=8 train.py --model sd3.5m --rewards hps,clip --prompts geneval
  torchrun --nnodes=2 --node_rank=R --master_addr=HOST --master_port=29500 --nproc_per_node=8 train.py ...
Defaults are tuned for the built-in world (see --help); each flag's help names the paper's or
the peers' value for real models where it differs. On GPUs (README, "Runbook"): --mixed-precision
(bf16 on CUDA: frozen weights in bf16, what trains in fp32), --gradient-checkpointing, --resolution,
--no-t5, --eval-batch, --report-to; every prompt is encoded once and cached, then the text encoders
leave the GPU. Rank 0 alone prints, writes and saves (but
each rank saves its own RNG states).

A run directory holds: config.json, metrics.jsonl (one line per iteration), reward.png,
samples/iter_NNNN.png (fixed held-out prompts, deterministic sampler), checkpoint/ (policy and
critic weights in safetensors, optimiser states in state.pt, each rank's RNG states in
rng_rank{r}.pt) and, at the end,
pipeline/ (tiny models: a diffusers directory loadable as --model, LoRA merged in) and/or
policy_lora/ (the LoRA adapter, loadable with pipe.load_lora_weights for SD models).
A checkpoint is saved after iteration 1, every --save-every and at the end. SIGINT / SIGTERM finish
the iteration, save one and exit 130 / 143. The same command (same --run-dir and flags) continues a
stopped run, as --resume does, or starts it again if it stopped before its first checkpoint; another
command's run there is never overwritten. 3 skipped updates in a row stop a diverging run, unsaved.

| paper (METHOD.md) | here |
|---|---|
| prompts c, K steps, the rollout (1, 2) | metas, --num-steps, rollout.sample -> traj |
| R, w_i, normalised rewards (6) | raw, mixer.weights, normalised (rewards.RewardMixer) |
| V_phi recorded at rollout time (3, 4) | old_values = critic.values(...) (B, K, R) |
| A_k, G_k (4); GRPO's group baseline (5) | adv, returns = ppo.gae(...); ppo.grpo_advantages |
| value pretraining W (3) | --value-warmup: train_policy=False for the first W iterations |
| the PPO update (5) | ppo.update; RAFT (the supervised reference): ppo.raft_update |

Not in the paper (METHOD.md 9): the SDE window (--sde-steps: only the first S steps are stochastic
and trained; they decide the layout a compositional reward judges, the near-clean steps' log-prob
gradients are mostly noise) and the critic's share (--critic-fraction, --head-epochs: its cost per
image). Over ~450 lines because the argparse groups (every flag with the paper's or the peers'
value in its help) and configure (every check before any work) stay beside the loop they feed.

Test: tests/test_train.py, tests/test_inputs.py (bad input, stopped and diverging runs)
"""
import argparse
import collections
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
import cli
import geneval
import ppo
import rewards
import rollout
import critic as critic_module
from cli import finite_float, integer
from critic import CRITIC, POLICY, adapter, adapter_params, explained_variance, \
    explained_variance_by_noise, lora_config, noise_fraction
from checkpoint import ConfigError, NonFiniteError
from eval import Reporter, heldout_metrics, plot_rewards, run_title, save_samples
from models import PRECISIONS, check_precision, check_resolution, default_precision, default_resolution, resolve

ALGOS = ("ppo", "grpo", "raft")
REPORTERS = ("none", "tensorboard", "wandb")
def build_parser():
    p = cli.Parser(description=__doc__.splitlines()[0])
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny-dit", help="tiny-dit | tiny-unet | sd1.5 | sd3.5m | a diffusers directory")
    g.add_argument("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device")
    cli.add_threads(g)
    g.add_argument("--lora-rank", type=integer(0), default=None,
                   help="LoRA rank of the policy and critic adapters on the shared frozen base; 0 = train full "
                        "copies (default: 16 for the built-in tiny models, 32 otherwise, the peers' value; a full "
                        "copy of tiny-dit drifts into a patch-grid texture under noisy updates, see BENCHMARKS.md)")
    g.add_argument("--lora-alpha", type=finite_float(min=0), default=None,
                   help="LoRA alpha (default 2 x rank: 64 at rank 32)")
    g.add_argument("--mixed-precision", choices=tuple(PRECISIONS), default=None,
                   help="dtype of the frozen weights (denoiser base, text encoders, VAE, reward models): bf16 | fp16 "
                        "| no (fp32). What trains (LoRA adapters or full copies, the value head) and the optimiser "
                        "states stay fp32, as diffusers' LoRA training scripts keep them; log-probs are computed in "
                        "fp32 from the model's output (default: bf16 on CUDA, no on CPU)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each transformer / UNet block in the backward pass instead of keeping its "
                        "activations (diffusers' enable_gradient_checkpointing): less memory, ~30%% more compute")
    g.add_argument("--no-t5", action="store_true",
                   help="SD3: load no T5-XXL text encoder (its tokens are zeros, as diffusers' pipeline does "
                        "without it): 4.8B parameters less to load and encode with")
    g.add_argument("--resolution", type=integer(8), default=None,
                   help="image side in pixels for training and evaluation (default: 512 for SD3.5-M, as the peers "
                        "train it; the model's native size otherwise)")
    g = p.add_argument_group("algorithm")
    g.add_argument("--algo", default="ppo",
                   help="ppo (critic-guided, the paper) | grpo (the baseline) | raft (rejection-sampling fine-tuning: "
                        "the pretraining loss on the samples that pass, the supervised reference)")
    g.add_argument("--iters", type=integer(1), default=160,
                   help="iterations (rollout batch + update each; default 160: 5,120 images, about 8 minutes on 2 CPU cores)")
    g.add_argument("--batch-size", type=integer(1), default=32,
                   help="images generated per iteration, all ranks together")
    g.add_argument("--group-size", type=integer(1), default=None,
                   help="samples per prompt G (default: 8 for grpo, whose baseline needs groups; 1 for ppo)")
    g.add_argument("--num-steps", type=integer(1), default=None,
                   help="denoising steps K in training (default: 10 for the built-in world; for SD models the "
                        "paper's 10 on SD3.5-M and DDPO's 50 on SD1.5)")
    g.add_argument("--sde-steps", type=integer(1), default=None,
                   help="stochastic (and trained) steps: the first S of the K; the rest run the deterministic "
                        "sampler (Flow-GRPO-Fast's SDE window; default: 5 for the built-in world, all K otherwise)")
    g.add_argument("--eval-num-steps", type=integer(1), default=None,
                   help="deterministic steps in evaluation (default: 10 for the built-in world; 40 for SD models, the paper's)")
    g.add_argument("--noise-level", type=finite_float(min=0, max=1), default=None,
                   help="SDE noise a (flow, default 0.7, Flow-GRPO's) or DDIM eta (default 1.0, DDPO's), in [0, 1]: "
                        "DDIM's eta is defined there, and above ~1.4 the flow SDE's step mean turns negative on a "
                        "10-step grid")
    g.add_argument("--cfg", type=finite_float(min=1), default=1.0,
                   help="classifier-free guidance scale w in training rollouts: 1 = off, the conditional prediction "
                        "alone (the paper trains CFG-free); w > 1 = uncond + w (cond - uncond); below 1 is not guidance")
    g.add_argument("--lr", type=finite_float(above=0), default=None,
                   help="policy AdamW learning rate (default: 1e-3 for the built-in world, measured: 1e-4 barely moves "
                        "it in 60 iterations, 3e-3 drifts off the world's boards; 3e-4 for SD models, the peers' value "
                        "for LoRA r=32 on SD3.5-M)")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None,
                   help="policy learning rate over --iters: cosine decays it to 0 at the last iteration (default for "
                        "the built-in world: at a constant 1e-3 its accuracy peaks near 3,500 images, then falls); "
                        "constant (default for SD models, as the peers)")
    g = p.add_argument_group("critic (--algo ppo)")
    g.add_argument("--critic", choices=critic_module.KINDS, default="learned",
                   help="what V(x_t) is in the advantages: learned (the paper's critic, trained here) | none (V = 0: "
                        "REINFORCE with the batch-normalised return; every step of a trajectory gets the same "
                        "advantage at lambda = 1) | proxy (the normalised reward of the decoded clean-image prediction "
                        "at x_t: the pixel-space critic of the paper's Fig. 2, FK-steering's potential) | proxy-fit (the "
                        "proxy on R's scale: a + b r(x0-hat), one line per step fitted by least squares to the batch's "
                        "other trajectories' rewards, so its own never enters its baseline) | oracle (the "
                        "mean reward of --oracle-continuations fresh continuations of the current policy from x_t: a "
                        "bound on what any critic can give, not a method; its extra images are logged apart). Only "
                        "'learned' trains and saves a critic")
    g.add_argument("--oracle-continuations", type=integer(1), default=8,
                   help="M, the continuations per state of --critic oracle (common random numbers across a "
                        "trajectory's states; the estimate's variance is Var(R | x_t) / M)")
    g.add_argument("--critic-adaln", choices=("on", "off"), default="on",
                   help="the value head's AdaLN noise-level modulation, the paper's first stabiliser (off: its "
                        "ablation; the second is --value-warmup)")
    g.add_argument("--critic-lr", type=finite_float(above=0), default=1e-4,
                   help="critic AdamW learning rate (its backbone copy or adapter)")
    g.add_argument("--critic-head-lr", type=finite_float(above=0), default=None,
                   help="learning rate of the critic's new value head (default: 1e-4 on the built-in world, with "
                        "--critic-replay 32; 1e-3 otherwise)")
    g.add_argument("--clip-range", type=finite_float(above=0), default=None,
                   help="PPO clip eps on the ratio (default: 1e-4 for SD models, the peers' (Flow-GRPO, DDPO); 1e-2 "
                        "for the built-in world: a per-element-mean log-prob over its 64 latent elements moves more "
                        "per update than over 262,144)")
    g.add_argument("--adv-norm", choices=("batch", "step"), default="batch",
                   help="how the advantages are normalised over the global batch: batch (one mean and std over every "
                        "(trajectory, step) pair) | step (each step centred on its own mean, one std: removes a "
                        "critic's per-noise-level bias, which batch centring leaves in every trajectory's step k)")
    g.add_argument("--adv-clip", type=finite_float(above=0), default=5.0,
                   help="clip advantages to [-c, c] (Flow-GRPO: 5)")
    g.add_argument("--gamma", type=finite_float(above=0, max=1), default=1.0, help="discount over denoising steps")
    g.add_argument("--gae-lambda", type=finite_float(min=0, max=1), default=1.0,
                   help="GAE lambda (1 = Monte Carlo with the critic as baseline: A = R - V, unbiased; < 1 lowers "
                        "variance only once the critic predicts well, see the benchmark's explained variance)")
    g.add_argument("--vf-clip", type=finite_float(min=0), default=0.0,
                   help="clip the value update around V_old (0 = off)")
    g.add_argument("--kl-coef", type=finite_float(min=0), default=0.0,
                   help="beta of the KL penalty to the frozen base on step means")
    g.add_argument("--value-warmup", type=integer(0), default=None,
                   help="iterations W of critic-only training before policy updates, the paper's second stabiliser "
                        "(default: 2 for --critic learned, 0 for the critics that learn nothing)")
    g.add_argument("--epochs", type=integer(1), default=1, help="passes over each batch")
    g.add_argument("--minibatch-size", type=integer(1), default=80,
                   help="(trajectory, step) pairs per optimiser step, all ranks together")
    g.add_argument("--critic-fraction", type=finite_float(above=0, max=1), default=0.1,
                   help="share of the (trajectory, step) pairs the critic's backbone trains on each iteration (its "
                        "cost per image; the head sees them all, --head-epochs); 1 during value warm-up")
    g.add_argument("--head-epochs", type=integer(0), default=None,
                   help="passes of the value head alone over every state per iteration, on the features the "
                        "rollout-time value pass computed anyway (cheap: no backbone pass; 0 = off; default 1 for "
                        "--critic learned)")
    g.add_argument("--critic-replay", type=integer(1), default=None,
                   help="iterations M whose states the value head's passes (--head-epochs) cover: this batch's and "
                        "the M - 1 before it (their features and targets kept on the CPU). 1 = this batch only "
                        "(default: 32 on the built-in world, where with head lr 1e-4 it fits the critic to 0.05-0.36 "
                        "explained variance along the window and ~0.8 at x_(t_1) instead of ~0: BENCHMARKS.md, "
                        "'Fitting the critic'; 1 otherwise)")
    g.add_argument("--critic-replay-states", choices=("all", "last"), default=None,
                   help="which of the earlier iterations' states the value head replays: all (the window's and "
                        "x_(t_1)), or last (x_(t_1) only, with --critic-terminal; this batch's window states still): a "
                        "window state's return is mostly noise, which 32 passes memorise, and the values then add "
                        "variance to the advantage (bench/critic_health.py), where x_(t_1) fixes the image and its "
                        "return (default: last on the built-in world with --critic-terminal and --critic-replay > 1; "
                        "all otherwise)")
    g.add_argument("--critic-terminal", action=argparse.BooleanOptionalAction, default=None,
                   help="the value head also learns the last state the denoiser reads, x_{t_1}, whose return is "
                        "fixed (after the SDE window the sampler is deterministic): a learned reward on latents, "
                        "which best-of-N and SMC choose by at inference (steer.py). Needs --sde-steps < --num-steps "
                        "(default: on, on the built-in world, so that its run's critic steers; off otherwise)")
    g.add_argument("--critic-text", action=argparse.BooleanOptionalAction, default=None,
                   help="the value head also attends over the prompt's text tokens (the denoiser's encoder_hidden_states, "
                        "projected): it then ranks images of prompts it never trained on better (BENCHMARKS.md, "
                        "'Fitting the critic'; default: on, on the built-in world; off otherwise)")
    g.add_argument("--critic-proxy-input", action=argparse.BooleanOptionalAction, default=None,
                   help="the value head also reads the proxy r(decode(x0_hat(x_t))), the reward of the policy's clean-"
                        "image prediction at each state, through a gain per noise level (V = head + g(t) r; a decode "
                        "and reward call per valued state, which the critic's regression reuses): a latent "
                        "head learns little of the reward from one run's states (bench/value_ceiling.py), the proxy "
                        "gives it the reward's own reading. Its critic does not steer (default: off)")
    g.add_argument("--raft-steps", type=integer(1), default=1,
                   help="raft: optimiser steps per iteration, each on --minibatch-size kept samples (with replacement). "
                        "On the built-in world 4 collapsed the policy (held-out 0.30 ± 0.06 over 5 seeds, below the base "
                        "model's 0.35): a few kept samples seen many times")
    g.add_argument("--max-grad-norm", type=finite_float(above=0), default=1.0, help="gradient clipping")
    g.add_argument("--seed", type=cli.SEED, default=0, help="base seed (rank r uses seed * world + r)")
    g = rewards.add_reward_args(p)
    g.add_argument("--prompts", default=None,
                   help="shapes (the built-in world's train/held-out split) | geneval (prompts from GenEval's "
                        "templates, never one of its 553 official prompts, which eval.py --prompts geneval reports) | "
                        "a .txt (one prompt a line) or GenEval .jsonl file (every 10th held out) (default: shapes "
                        "for the built-in world; geneval for SD models, the paper's benchmark)")
    g.add_argument("--train-tags", default=None,
                   help="train on the prompts of these metadata tags only, comma-separated (e.g. counting); "
                        "held-out evaluation keeps every tag, so it measures the transfer")
    g = p.add_argument_group("logging")
    g.add_argument("--run-dir", type=cli.nonempty, default=None,
                   help="output directory (default runs/ALGO-MODEL-TIME); never overwritten")
    g.add_argument("--resume", type=cli.nonempty, default=None, metavar="RUN_DIR",
                   help="continue this run from its last checkpoint")
    g.add_argument("--eval-every", type=integer(1), default=10,
                   help="held-out evaluation every N iterations (and at the end)")
    g.add_argument("--eval-seeds", type=integer(1), default=4, help="images per held-out prompt in evaluation")
    g.add_argument("--eval-batch", type=integer(1), default=64,
                   help="images sampled (and scored) at once in evaluation and sample grids, per chunk")
    g.add_argument("--sample-every", type=integer(1), default=20,
                   help="save a sample grid every N iterations (and at the end)")
    g.add_argument("--save-every", type=integer(1), default=20, help="checkpoint every N iterations (and at the end)")
    g.add_argument("--dist-timeout", type=integer(1), default=30,
                   help="torchrun: minutes a collective waits for the other ranks before the run fails (NCCL's "
                        "default, 10, can pass while a node with a cold cache loads the weights)")
    g.add_argument("--report-to", choices=REPORTERS, default="none",
                   help="also send each iteration's metrics to tensorboard (RUN_DIR/tensorboard) or wandb (its package "
                        "must be installed; offline: WANDB_MODE=offline); metrics.jsonl is always written")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration (every default filled in) as JSON and exit; loads no weights")
    return p


# ----------------------------------------------------------------------------- configuration

def load_prompts(source, seed=0):
    """(train, heldout): lists of metadata dicts, each with at least a "prompt"."""
    if source == "shapes":
        import toy
        return toy.prompts("train"), toy.prompts("heldout")
    if source == "geneval":       # GenEval's templates, never its 553 official prompts; held-out ones unseen in training
        train = geneval.prompts(2000, seed=seed)
        return train, geneval.prompts(200, seed=seed + 1, exclude=[m["prompt"] for m in train])
    if not os.path.isfile(source):
        raise ConfigError(f"--prompts {source!r}: not shapes, geneval or an existing file")
    text = cli.read_text("--prompts", source)                    # a binary file fails here, in one line
    if source.endswith(".jsonl"):
        metas = geneval.read_metadata(source)
    else:
        metas = [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]
    if len(metas) < 2:
        raise ConfigError(f"--prompts {source}: needs at least 2 prompts")
    held = {i for i in range(len(metas)) if i % 10 == 9} or {len(metas) - 1}
    return [m for i, m in enumerate(metas) if i not in held], [m for i, m in enumerate(metas) if i in held]


def configure(args, argv):
    """Validate every flag and path and derive the batch sizes, before any work. Returns the
    final args (a resumed run's config), the reward spec, and the prompt lists."""
    if args.resume:
        args = checkpoint.resumed_config(args, argv, build_parser)
    if args.algo not in ALGOS:
        raise ConfigError(f"unknown algorithm {args.algo!r}; choose from {', '.join(ALGOS)}")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and "RANK" not in os.environ:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but RANK is not: start a multi-process run "
                          "with torchrun (e.g. torchrun --nproc_per_node=8 train.py ...), or unset WORLD_SIZE")
    _, kind = resolve(args.model)                                  # BackboneError if unknown
    args.shapes_world = kind == "ShapesPipeline"
    args.rewards = args.rewards if args.rewards is not None else ("shapes" if args.shapes_world else "hps,clip")
    spec = rewards.parse_reward_args(args)                          # RewardError if bad
    # defaults by model: the built-in world's tuned values, or the paper's and peers' for SD models (see --help)
    defaults = {"prompts": "shapes", "num_steps": 10, "eval_num_steps": 10, "lr": 1e-3, "clip_range": 1e-2,
                "lr_schedule": "cosine"}
    if not args.shapes_world:
        defaults = {"prompts": "geneval", "num_steps": 10 if kind == "StableDiffusion3Pipeline" else 50,
                    "eval_num_steps": 40, "lr": 3e-4, "clip_range": 1e-4, "lr_schedule": "constant"}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.lora_rank is None:
        args.lora_rank = 16 if args.shapes_world else 32
    if args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_rank
    if args.group_size is None:
        args.group_size = 8 if args.algo == "grpo" else 1
    if args.noise_level is None:
        args.noise_level = None if kind == "ShapesPipeline" else (0.7 if kind == "StableDiffusion3Pipeline" else 1.0)
    if args.sde_steps is None:
        args.sde_steps = min(5, args.num_steps) if args.shapes_world else args.num_steps
    if args.mixed_precision is None:
        args.mixed_precision = default_precision(args.device)
    if check_precision(args.mixed_precision, args.device):
        raise ConfigError(check_precision(args.mixed_precision, args.device))
    alien = [n for n in spec.names + spec.monitor if n in rewards.WORLD_ONLY]
    if alien and not args.shapes_world:
        raise ConfigError(f"reward '{alien[0]}' judges the built-in world's 32 px boards only; {args.model} is not a "
                          "built-in world model: use hps, clip, pickscore, geneval ...")
    if args.resolution is None:
        args.resolution = default_resolution(args.model)
    bad_size = check_resolution(args.model, args.resolution)
    if bad_size:
        raise ConfigError(bad_size)
    if args.no_t5 and kind != "StableDiffusion3Pipeline":
        raise ConfigError(f"--no-t5: {args.model} is not an SD3 pipeline (only SD3 has a T5 encoder)")
    if args.report_to != "none":
        import importlib.util
        if importlib.util.find_spec(args.report_to) is None:
            raise ConfigError(f"--report-to {args.report_to}: the {args.report_to} package is not installed "
                              f"(pip install {args.report_to})")
    # each flag's own range is its type= check (build_parser); what is left relates flags to each other
    if args.sde_steps > args.num_steps:
        raise ConfigError(f"--sde-steps {args.sde_steps} exceeds --num-steps {args.num_steps}")
    # the learned critic's settings: on the built-in world the fitted critic (its head on the last 32 iterations'
    # states at head lr 1e-4, also on x_(t_1) and on the prompt's text tokens: the critic that steers, and that
    # fits at all, BENCHMARKS.md); elsewhere the paper's head on this batch. Without a learned critic (GRPO, RAFT,
    # --critic none / proxy / oracle) there is no head: these flags then keep their 'off' values, or are refused
    learned = args.algo == "ppo" and args.critic == "learned"
    fitted = learned and args.shapes_world
    on = {"value_warmup": 2, "head_epochs": 1, "critic_replay": 32 if fitted else 1, "critic_head_lr": 1e-4 if fitted else 1e-3,
          "critic_terminal": fitted and args.sde_steps < args.num_steps, "critic_text": fitted, "critic_adaln": "on",
          "critic_proxy_input": False}
    off = {"value_warmup": 0, "head_epochs": 0, "critic_replay": 1, "critic_head_lr": 1e-3, "critic_terminal": False,
           "critic_text": False, "critic_adaln": "on", "critic_proxy_input": False}
    for name in on:
        given, flag = getattr(args, name), "--" + name.replace("_", "-")
        if given is None:
            setattr(args, name, on[name] if learned else off[name])
        elif not learned and given != off[name] and name != "critic_head_lr":
            raise ConfigError(f"{flag}{'' if isinstance(given, bool) else ' ' + str(given)}: only --algo ppo --critic "
                              f"learned has a critic to train (here --algo {args.algo} --critic {args.critic})")
    if args.adv_norm != "batch" and args.algo != "ppo":
        raise ConfigError(f"--adv-norm {args.adv_norm}: --algo {args.algo} makes its advantages without it (only ppo "
                          "normalises a critic's advantages)")
    if args.critic != "learned" and args.algo != "ppo":
        raise ConfigError(f"--critic {args.critic}: --algo {args.algo} uses no critic (only ppo does)")
    if args.critic_terminal and (args.sde_steps == args.num_steps or args.algo != "ppo" or not args.head_epochs):
        raise ConfigError("--critic-terminal needs --algo ppo, --head-epochs >= 1 (the head learns x_(t_1)) and an SDE "
                          f"window shorter than the sampler (--sde-steps {args.sde_steps} < --num-steps {args.num_steps})")
    if args.critic_replay_states is None:  # the built-in world's default critic replays x_(t_1) alone (--help)
        args.critic_replay_states = "last" if fitted and args.critic_terminal and args.critic_replay > 1 else "all"
    if args.critic_replay_states == "last" and not (args.critic_terminal and args.critic_replay > 1):
        raise ConfigError("--critic-replay-states last needs --critic-terminal and --critic-replay > 1 (it replays "
                          "the earlier iterations' x_(t_1) only)")
    if args.algo == "grpo" and args.group_size < 2:
        raise ConfigError(f"--algo grpo needs --group-size >= 2 (its baseline is the group mean), got {args.group_size}")
    # derived sizes: asserted to divide evenly, as DDPO does
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % (world * args.group_size):
        raise ConfigError(f"--batch-size {args.batch_size} is not divisible by world size {world} x --group-size "
                          f"{args.group_size}")
    args.world_size = world
    args.batch_per_rank = args.batch_size // world
    args.prompts_per_rank = args.batch_per_rank // args.group_size
    pairs = args.batch_per_rank * args.sde_steps                  # the trained (trajectory, step) pairs
    if args.minibatch_size % world or pairs % (args.minibatch_size // world):
        raise ConfigError(f"--minibatch-size {args.minibatch_size} must split into {world} rank(s) and divide the "
                          f"{pairs} (trajectory, step) pairs per rank ({args.batch_per_rank} images x {args.sde_steps} steps)")
    args.minibatch_per_rank = args.minibatch_size // world
    args.minibatches = pairs // args.minibatch_per_rank
    args.critic_pairs = max(1, round(args.critic_fraction * pairs))
    train_prompts, heldout = load_prompts(args.prompts, args.seed)
    if args.train_tags:
        known = sorted({m.get("tag", "") for m in train_prompts})
        wanted = args.train_tags.split(",")
        for tag in wanted:
            if tag not in known:
                raise ConfigError(f"--train-tags: no training prompt has the tag {tag!r}; "
                                  + (f"the tags are {', '.join(known)}" if any(known) else "these prompts carry no tags"))
        train_prompts = [m for m in train_prompts if m.get("tag", "") in wanted]
    rewards.check_metadata(spec.names + spec.monitor, train_prompts + heldout, [m["prompt"] for m in train_prompts + heldout])
    checkpoint.claim_run_dir(args)                                # never overwrites a different run
    return args, spec, train_prompts, heldout


# ----------------------------------------------------------------------------- models

def build(args, backbone, num_rewards, mixer=None, generator=None):
    """Policy, frozen reference, critic (None for GRPO and RAFT) and their optimisers.
    Full copies (tiny models): policy = a trainable copy, reference = backbone.net untouched,
    critic = another copy + head. LoRA: 'policy' and 'critic' adapters on the one frozen
    backbone.net, whose adapters-off forward is the reference. --critic none / proxy / oracle:
    a critic that learns nothing (critic.py's controls; no optimiser); the proxy and the oracle
    score images with the mixer, normalised by its statistics, and the oracle continues with the
    policy and draws its noise from the rollout's generator."""
    torch.manual_seed(args.seed)                  # same initial head / adapters on every rank
    if args.lora_rank:
        backbone.net.add_adapter(lora_config(backbone, args.lora_rank, args.lora_alpha), adapter_name=POLICY)
        policy_net = ref_net = backbone.net
        policy_params = adapter_params(backbone.net, POLICY)
    else:
        import copy
        policy_net, ref_net = copy.deepcopy(backbone.net).requires_grad_(True), backbone.net
        policy_params = list(policy_net.parameters())
    critic = None
    if args.algo == "ppo":
        score = mixer and (lambda images, prompts, metas: mixer(images, prompts, metas, update_stats=False)["normalised"])
        critic = critic_module.build(args.critic, backbone, num_rewards, lora=bool(args.lora_rank),
                                     rank=args.lora_rank or 32, alpha=args.lora_alpha or 64, text=args.critic_text,
                                     adaln=args.critic_adaln == "on", score=score, policy_net=policy_net,
                                     continuations=args.oracle_continuations, generator=generator,
                                     reduce=ppo.all_reduce_sum, proxy_input=args.critic_proxy_input)
    learned = critic if critic is not None and critic.learned else None
    if args.lora_rank:
        backbone.net.set_adapter(POLICY)          # what an unwrapped forward of the base runs
        for p in adapter_params(backbone.net, POLICY) + adapter_params(backbone.net, CRITIC):
            p.requires_grad_(True)
    # what trains is fp32 under any --mixed-precision, as in diffusers' LoRA scripts (bf16 weights would round
    # away updates of lr x grad and hold Adam's states coarsely): the adapters on the low-precision base (its
    # cast_training_params), or whole full copies, which Backbone._call then feeds in fp32
    if args.lora_rank:
        from diffusers.training_utils import cast_training_params
        cast_training_params(backbone.net)        # its trainable parameters: the policy and critic adapters
    else:
        policy_net.float()
        if learned is not None:
            learned.float()
    if args.gradient_checkpointing:
        for net in filter(None, (policy_net, learned.backbone_net if learned is not None else None)):
            net.enable_gradient_checkpointing()
    # weight decay 1e-4 as Flow-GRPO; Adam's eps 1e-8 (the log-prob gradients are small)
    opt_policy = torch.optim.AdamW(policy_params, lr=args.lr, weight_decay=1e-4)
    opt_critic = torch.optim.AdamW(learned.param_groups(args.critic_lr, args.critic_head_lr), weight_decay=0.0) if learned else None
    if args.mixed_precision == "fp16":            # fp16 gradients underflow without a loss scale
        for opt in filter(None, (opt_policy, opt_critic)):
            opt.loss_scale = ppo.LossScale()
    return policy_net, ref_net, critic, opt_policy, opt_critic


# ----------------------------------------------------------------------------- training

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args, spec, train_prompts, heldout = configure(args, argv)
        if args.print_config:
            print(json.dumps({k: v for k, v in vars(args).items() if k != "print_config"}, indent=2))
            return 0
        cli.set_threads(args.threads, args.device)
        STOP.clear()
        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return train(args, spec, train_prompts, heldout)
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
    except (cli.InputError, NonFiniteError) as e:      # bad input (the reward models load first), or a diverged run
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        return stopped(args, e.signum, "mid-iteration (its last checkpoint stands)")
    except KeyboardInterrupt:                          # Ctrl-C while checking flags, before any run directory
        print("interrupted before training started; nothing was written", file=sys.stderr)
        return 130


# SIGINT / SIGTERM while training: the first lets the iteration finish, then a checkpoint is saved and
# the run exits 130 / 143 saying how to resume; a second stops at once (Interrupted), and a save cut
# off by it never replaces the last checkpoint (save_checkpoint swaps whole directories)
STOP = []                                             # the signal that asked to stop, once one has


class Interrupted(Exception):
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def on_signal(signum, frame):
    if STOP:
        raise Interrupted(signum)
    STOP.append(signum)
    if ppo.rank() == 0:
        from tqdm import tqdm
        tqdm.write(f"{signal.Signals(signum).name}: stopping after this iteration, with a checkpoint "
                   "(again to stop at once)")


def stopped(args, signum, when):
    """The one line a stopped run prints: how to continue it. Exit code 128 + signal (130, 143)."""
    if ppo.rank() == 0:
        from tqdm import tqdm                     # tqdm.write: on its own line, not after the progress bar's
        tqdm.write(f"stopped by {signal.Signals(signum).name} {when}; continue with: python train.py --resume "
                   f"{args.run_dir}", file=sys.stderr)
    return 128 + signum


def train(args, spec, train_prompts, heldout):
    from models import load_backbone
    rank, world, device = ppo.setup_distributed(args.device, args.dist_timeout)
    master = rank == 0
    args.run_dir = ppo.rank0_text(args.run_dir)                  # one run: rank 0's (the default name is a time)
    args.resume = ppo.rank0_text(args.resume or "") or None      # and rank 0's view of whether it continues one
    log = print if master else (lambda *a, **k: None)
    seed = args.seed * world + rank                               # DiT: a different stream per rank
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    dtype = PRECISIONS[args.mixed_precision]
    mixer = spec.mixer(device, dtype)       # reward models first: one without its weights fails before the run exists
    if master:
        os.makedirs(os.path.join(args.run_dir, "samples"), exist_ok=True)
        if not args.resume:                 # whole or absent: --resume and a rerun read it
            with open(os.path.join(args.run_dir, "config.json.tmp"), "w") as f:
                json.dump(vars(args), f, indent=2)
            os.replace(os.path.join(args.run_dir, "config.json.tmp"), os.path.join(args.run_dir, "config.json"))
    log(f"run {args.run_dir}: {args.algo} on {args.model}, rewards {','.join(spec.names)} "
        f"(weights {','.join(f'{w:g}' for w in spec.weights)})")
    log(f"batch: {args.batch_size} images/iter = {world} rank(s) x {args.prompts_per_rank} prompts x {args.group_size} "
        f"samples; {args.batch_per_rank * args.sde_steps} (trajectory, step) pairs/rank -> {args.minibatches} minibatches "
        f"of {args.minibatch_per_rank} x {args.epochs} epoch(s); critic backbone on {args.critic_pairs} of the pairs, "
        f"its head on all of them ({args.head_epochs} epoch(s))")
    assert args.batch_per_rank * world == args.batch_size and args.prompts_per_rank * args.group_size == args.batch_per_rank
    assert args.minibatches * args.minibatch_per_rank == args.batch_per_rank * args.sde_steps

    backbone = load_backbone(args.model, device, dtype, no_t5=args.no_t5, resolution=args.resolution)
    # every prompt of the run encoded once, then the text encoders leave the accelerator
    backbone.cache_prompts([m["prompt"] for m in train_prompts + heldout])
    backbone.offload_text_encoders()
    noise_level = args.noise_level if args.noise_level is not None else rollout.TRAIN_NOISE[backbone.sampler]
    weights = mixer.weights                                       # (R,)
    prompt_rng = random.Random(seed)
    gen = torch.Generator(device).manual_seed(seed)              # rollout noise (and the oracle critic's)
    policy_net, ref_net, critic, opt_policy, opt_critic = build(args, backbone, len(spec.names), mixer, gen)
    if world > 1:                 # build seeded every rank alike (the same head and adapters); now each its own stream
        torch.manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed + 12345)        # minibatch order

    start, images_seen, rows = 0, 0, []
    replay = collections.deque(maxlen=args.critic_replay)        # the value head's recent data (--critic-replay)
    # rank 0's view of the run directory decides for every rank (another node's file cache may lag behind)
    if args.resume and not ppo.rank0_text("yes" if checkpoint.find_checkpoint(args.run_dir) else ""):
        log(f"{args.run_dir} stopped before its first checkpoint: starting it again from its config.json")
    elif args.resume:
        start, images_seen, rows = checkpoint.resume(args, policy_net, critic, opt_policy, opt_critic, mixer,
                                                     prompt_rng, gen, shuffle, master, replay)
        log(f"resumed from iteration {start} ({images_seen} images)")
    report = Reporter(args, start) if master else None
    by_tag = {}
    for m in train_prompts:
        by_tag.setdefault(m.get("tag", ""), []).append(m)
    tags = sorted(by_tag)
    grid_metas = heldout[::max(1, len(heldout) // 8)][:8]
    if master:
        with open(os.path.join(args.run_dir, "samples", "prompts.txt"), "w") as f:
            f.write("\n".join(m["prompt"] for m in grid_metas) + "\n")
    # the base model: where every curve starts (every rank evaluates its share)
    base = heldout_metrics(args, backbone, policy_net, mixer, heldout, range(args.eval_seeds)) if start == 0 else None
    if master and start == 0:
        rows.append({"iter": 0, "images": 0, "time/total_train_s": 0.0, **base})
        save_samples(args, backbone, policy_net, grid_metas, os.path.join(args.run_dir, "samples", "iter_0000.png"),
                     iteration=0)
        with open(os.path.join(args.run_dir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps(rows[0]) + "\n")
        report.log(rows[0])
        log(" | ".join(["base model"] + [f"{k.split('/')[-1]} {v:.3f}" for k, v in rows[0].items() if k.startswith("eval/")]))
    from tqdm import tqdm
    bar = tqdm(range(start, args.iters), desc=args.algo, disable=not master, dynamic_ncols=True,
               initial=start, total=args.iters)
    skipped_in_a_row = 0
    for it in bar:
        if args.lr_schedule == "cosine":          # a function of the iteration alone, so a resume stays exact
            for group in opt_policy.param_groups:
                group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * it / args.iters))
        t0 = time.perf_counter()
        # 1. prompts (category first, so small categories are not drowned) and rollouts
        metas = [by_tag[prompt_rng.choice(tags)] for _ in range(args.prompts_per_rank)]
        metas = [m for group in metas for m in [prompt_rng.choice(group)] * args.group_size]   # G adjacent copies
        prompts = [m["prompt"] for m in metas]
        with adapter(policy_net, POLICY) as net:
            traj = rollout.sample(backbone, prompts, args.num_steps, noise_level, args.cfg, generator=gen, net=net,
                                  sde_steps=args.sde_steps, metas=metas)
        B, K = len(prompts), args.sde_steps              # the trained steps: the SDE window
        F = K + 1 if args.critic_terminal else K         # the states the value head learns: and x_{t_1}
        # 2. rewards: every rank's raw scores gathered before normalising (identical statistics everywhere)
        skip = None
        try:
            raw, strict = mixer.score(traj.images, prompts, metas)                             # (B, R)
            monitor, _ = mixer.score(traj.images, prompts, metas, mixer.monitor)
        except rewards.RewardError as e:
            skip, raw, strict, monitor = str(e), torch.full((B, len(spec.names)), float("nan")), {}, None
        bad = ppo.all_reduce_sum(torch.tensor([float(not torch.isfinite(traj.log_probs).all()),
                                               float(skip is not None)]))
        if bad[0] > 0:                            # the policy itself is broken, whatever the rewards made of its images
            skip = "non-finite log-probabilities"
        elif bad[1] > 0:
            skip = skip or "a reward failed on another rank"
        row = {"iter": it + 1, "images": images_seen + args.batch_size, "lr/policy": opt_policy.param_groups[0]["lr"]}
        if skip is None:
            raw_all = ppo.all_gather(raw.to(device)).cpu()                                         # (world*B, R)
            normalised_all = mixer.normalise(raw_all)                                           # (world*B, R)
            normalised = normalised_all[rank * B:(rank + 1) * B]                                # (B, R)
            out = {"raw": raw_all, "normalised": normalised_all, "total": normalised_all @ weights,
                   "monitor": ppo.all_gather(monitor.to(device)).cpu(),
                   "strict": {n: ppo.all_gather(s.to(device)).cpu() for n, s in strict.items()}}
            row.update(mixer.log_dict(out))
            row["reward/train/total_raw"] = (raw_all @ weights).mean().item()
            if "shapes" in out["strict"]:
                row["reward/train/strict"] = out["strict"]["shapes"].float().mean().item()
            # 3. advantages: critic + GAE (per reward, then weighted), or GRPO's group baseline
            mask = (traj.stds[:K] > 0).expand(B, K)                                            # (B, K)
            returns = old_values = features = None
            if args.algo == "ppo":
                t_values = time.perf_counter()
                with torch.no_grad():
                    # any kind of critic (--critic); the head's inputs are kept only if the head trains on them
                    old_values = critic.values(backbone, traj, keep_features=args.head_epochs > 0, steps=K,
                                               last=args.critic_terminal, rewards=normalised)
                    if args.head_epochs:
                        old_values, features = old_values
                    old_values = old_values.cpu()                                               # (B, F, R)
                row.update({"time/critic_values_s": time.perf_counter() - t_values, **critic.cost})
                # with an SDE window the reward arrives at its last step: the deterministic tail maps
                # x_{t_S} to x_0, so the state after the window is worth R exactly (terminal, as x_0)
                adv, returns = ppo.gae(normalised, old_values[:, :K], args.gamma, args.gae_lambda)   # (B, K, R) each
                advantages = ppo.normalise((adv * weights).sum(-1), mask, args.adv_norm == "step")   # (B, K)
                if F > K:                  # --critic-terminal: x_{t_1}'s target is that fixed return, R
                    returns = torch.cat([returns, normalised[:, None].to(returns.dtype)], 1)     # (B, F, R)
                if features is not None:   # the head's data: this batch's states and the last M - 1 batches'
                    keep = (lambda t: t.cpu()) if args.critic_replay > 1 else (lambda t: t)   # kept ones wait on the CPU
                    replay.append(tuple(keep(t) for t in (*features, returns.reshape(B * F, -1),
                                                          old_values.reshape(B * F, -1))))
                    kept = list(replay)
                    if args.critic_replay_states == "last":
                        # earlier batches give x_(t_1) alone (rows b*F + F - 1), so that is all the replay keeps of
                        # a batch past its own iteration (F x less memory): this one's once used whole, and any a
                        # checkpoint written before this version kept whole
                        for i in range(len(replay)):
                            if len(replay[i][0]) == B * F:
                                replay[i] = tuple(t[F - 1::F].clone() for t in replay[i])   # a view would hold every row
                        kept = list(replay)[:-1] + kept[-1:]
                    features = [torch.cat(t) for t in zip(*kept)]                  # (rows, N, D), ...
                # the critic's health: EV against its regression targets (CleanRL's), and, per noise
                # level, against the final reward itself (the paper's premise: predictable from x_t)
                v_total, g_total = (old_values[:, :K] * weights).sum(-1), (returns[:, :K] * weights).sum(-1)  # (B, K)
                r_total = (normalised @ weights)[:, None].expand(B, K)                        # (B, K)
                noise = noise_fraction(backbone, traj.levels[:K])                             # (K,)
                row["critic/explained_variance"] = explained_variance(v_total.flatten(), g_total.flatten())
                row.update({f"critic/ev_noise_{k}": v for k, v in explained_variance_by_noise(v_total, r_total, noise).items()})
                if F > K:                  # x_{t_1}: a learned reward, its ceiling is 1
                    row["critic/ev_terminal"] = explained_variance((old_values[:, K] * weights).sum(-1), r_total[:, 0])
            elif args.algo == "grpo":
                advantages = ppo.grpo_advantages(normalised @ weights, args.group_size)[:, None].expand(B, K)
            # 4. the update: critic only during value warm-up, then both (RAFT: fine-tune on what passed)
            warmup = args.algo == "ppo" and it < args.value_warmup
            if args.algo == "raft":
                # keep the strict passes where a reward has a verdict (the shapes checker), else the top quarter
                total = normalised @ weights                                                    # (B,)
                keep = (strict[next(iter(strict))].to(total.device).bool() if strict else
                        total >= torch.quantile(out["total"], 0.75))
                row.update(ppo.raft_update(backbone, traj, keep, policy_net, opt_policy, args, shuffle))
            else:
                advantages = advantages.clamp(-args.adv_clip, args.adv_clip)
                if returns is not None:
                    returns, old_values = returns.to(device), old_values.to(device)
                row.update(ppo.update(backbone, traj, advantages.to(device), returns, old_values, policy_net, ref_net,
                                      critic, opt_policy, opt_critic, args, shuffle, train_policy=not warmup,
                                      critic_pairs=None if warmup else args.critic_pairs,
                                      features=features))
            row["warmup"] = warmup
            if row["losses/skipped"]:
                log(f"warning: iteration {it + 1}: {row['losses/skipped']} minibatch update(s) skipped (non-finite loss or gradient)")
        else:
            log(f"warning: iteration {it + 1}: update skipped ({skip})")
            row["skipped"] = skip
        # the same on every rank (the skips are agreed collectively); nothing more is saved from here
        skipped_in_a_row = skipped_in_a_row + 1 if skip or row["losses/skipped"] else 0
        if skipped_in_a_row == 3:
            cause = (f"a reward fails: {skip}" if skip and skip != "non-finite log-probabilities" else
                     f"{skip or 'non-finite losses or gradients'}: the weights have likely diverged, the learning rate "
                     f"is probably too high (--lr {args.lr:g}, --critic-lr {args.critic_lr:g})")
            raise NonFiniteError(f"iterations {it - 1}-{it + 1}: the update was skipped 3 times in a row ({cause}); "
                                 "stopped without saving (the last good checkpoint is kept)")
        images_seen += args.batch_size
        train_time = time.perf_counter() - t0
        row.update({"time/iter_s": train_time, "time/per_image_s": train_time / args.batch_size})
        row["time/total_train_s"] = (rows[-1]["time/total_train_s"] if rows else 0.0) + train_time
        # 5. evaluation (every rank, its share), samples, checkpoints (rank 0; the others wait)
        last = it + 1 == args.iters
        if (it + 1) % args.eval_every == 0 or last:            # cut short by a stop signal: no figures this time
            row.update(heldout_metrics(args, backbone, policy_net, mixer, heldout, range(args.eval_seeds),
                                       stop=lambda: bool(STOP)))
        if master and not STOP and ((it + 1) % args.sample_every == 0 or last):
            save_samples(args, backbone, policy_net, grid_metas, os.path.join(args.run_dir, "samples", f"iter_{it + 1:04d}.png"),
                         iteration=it + 1)
        if master:
            rows.append(row)
            with open(os.path.join(args.run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            report.log(row)
            parts = [f"it {it + 1}/{args.iters}", f"img {row['images']}"]
            if "reward/train/total_raw" in row:
                parts.append(f"reward {row['reward/train/total_raw']:.3f}")
            for key, name in (("reward/train/strict", "strict"), ("eval/heldout_strict", "heldout"),
                              ("losses/approx_kl", "approx_kl"), ("losses/clipfrac", "clip"),
                              ("critic/explained_variance", "EV"), ("losses/ratio_dev_first", "|r-1|")):
                if key in row:
                    parts.append(f"{name} {row[key]:.3g}")
            bar.write(" | ".join(parts + [f"{train_time:.1f}s"] + (["warm-up"] if row.get("warmup") else [])))
            if (it + 1) % args.eval_every == 0 or last:
                plot_rewards(args.run_dir, rows, run_title(args))
        # the first checkpoint early (a run killed soon after it starts resumes, not restarts), then every
        # --save-every, at the end, and when a signal asked to stop (every rank stops at the same iteration)
        stopping = ppo.all_reduce_sum(torch.tensor([float(bool(STOP))])).item() > 0
        if it == 0 or (it + 1) % args.save_every == 0 or last or stopping:
            checkpoint.save_checkpoint(args, it + 1, images_seen, policy_net, critic, opt_policy, opt_critic, mixer,
                                       lambda: checkpoint.rng_states(prompt_rng, gen, shuffle),
                                       replay if args.critic_replay > 1 else ())     # M = 1: nothing carries over
            ppo.barrier()
        if stopping and not last:
            return stopped(args, STOP[0] if STOP else signal.SIGTERM, f"after iteration {it + 1} of {args.iters}, "
                           "checkpoint saved")
    if master and (args.iters > start or not checkpoint.exported(args.run_dir)):   # or an export cut off before
        log(f"saved {checkpoint.export_final(args, backbone, policy_net)}; metrics in {os.path.join(args.run_dir, 'metrics.jsonl')}")
    if master:
        report.close()
    if ppo.world_size() > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
