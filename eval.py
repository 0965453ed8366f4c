"""Evaluation, with or without critic steering: one entry point for every model (arXiv 2605.27736,
its Figs. 7 and 9; METHOD.md section 7; the steering methods are in steer.py).

  python eval.py --steer bon                          # built-in world: the newest train.py run's policy and critic
  python eval.py --policy runs/ppo-... --steer smc --n 8 --seeds 8
  python eval.py --model sd3.5m --policy RUN --critic RUN --steer grad+bon --prompts geneval --rewards hps,clip

Writes a run-style directory (never overwritten): results.json (per prompt and seed: every reward,
the strict verdict where a reward has one, NFE), summary.json and a line per reward (mean ±
standard error over images), grid.png (prompt above each column, N candidates of seed 0 below,
the score under each, the chosen one captioned, pass/fail frames where a reward judges), and for
GenEval-style prompts geneval/ in GenEval's own layout (NNNNN/metadata.jsonl, NNNNN/samples/SSSS.png)
so its official scorer runs on it. Bad input: one line, exit code 2, before anything is loaded.

It also holds what a training run reports (METHOD.md 8; train.py imports them): heldout_metrics()
(held-out prompts, deterministic sampler), save_samples() (labelled grids), plot_rewards(), and
Reporter (--report-to tensorboard | wandb). Over ~450 lines because both halves are evaluation: the entry
point's checks (configure: every flag before anything loads) and the training run's reports share it.

| paper (METHOD.md) | here |
|---|---|
| bon, smc, grad, grad+bon, proxy-smc (7) | --steer (steer.METHODS), sampled by steer.steer() |
| N, lam, s (7) | --n, --lam, --guidance |
| V = sum_i w_i V_i: the heads weighted at inference (6) | steer.critic_value_fn(..., w); w: --steer-weights, else the critic run's |
| NFE per final image, by kind (7) | steer.Steered.nfe {denoiser, critic_forward, critic_backward, reward} |
| held-out reward, accuracy against images generated (8) | heldout_metrics() (eval/heldout_*), plot_rewards() -> reward.png |

Test: tests/test_steer.py
"""
import argparse
import datetime
import glob
import json
import math
import os
import shutil
import sys

import torch

import cli
import geneval
import rewards
import rollout
import steer
from cli import finite_float, integer
from critic import POLICY, adapter, check_loadable
from models import PRECISIONS, check_precision, check_resolution, default_precision, default_resolution, load_backbone, \
    resolve

PARTIAL, PARTIAL_MARK = ".partial", ".eval-in-progress"   # where an evaluation is written before it becomes --out


# ----------------------------------------------------------------------------- what a training run reports
# (train.py; METHOD.md section 8): held-out metrics, sample grids, the reward curve, tensorboard / wandb

@torch.no_grad()
def heldout_metrics(args, backbone, policy_net, mixer, heldout, seeds, stop=None):
    """Held-out prompts x seeds with the deterministic sampler (noise 0): strict accuracy and
    partial credit of the built-in world's checker, and the raw mean of every reward and monitor.
    Called on every rank: rank r samples and scores units r, r + world, ... of rollout.seeded_noise
    (chunks of --eval-batch prompts of one seed, the images one process makes) and the sums are
    added over ranks. So 8 GPUs evaluate in about an eighth of the time, and no rank waits at a
    collective for the whole evaluation (SD3.5-M's 800 held-out images take minutes on one GPU, near
    NCCL's 10-minute watchdog). stop: a callable, checked before each unit; once it is true on any
    rank the evaluation ends early and returns {} (train.py's SIGTERM: torchrun SIGKILLs its workers
    --shutdown-timeout seconds later, and a checkpoint must be written before that)."""
    import ppo
    import toy
    names = mixer.names + mixer.monitor                            # monitors too: reward hacking shows here
    # (count, strict, partial credit, each reward's raw score, reward failures, stopped), summed in float64
    sums, error = torch.zeros(5 + len(names), dtype=torch.float64), None
    with adapter(policy_net, POLICY) as net:
        units = rollout.seeded_noise(backbone, [m["prompt"] for m in heldout], seeds, args.eval_batch)
        for u, (offset, prompts, x_T) in enumerate(units):
            if stop is not None and stop():
                sums[-1] = 1
                break
            if u % ppo.world_size() != ppo.rank():
                continue
            images = rollout.sample(backbone, prompts, args.eval_num_steps, 0.0, net=net, latents=x_T).images.cpu()
            metas = [heldout[(offset + i) % len(heldout)] for i in range(len(prompts))]
            sums[0] += len(images)
            if args.shapes_world:
                strict, score = toy.check(images, metas)
                sums[1:3] += torch.stack([strict.double().sum(), score.double().sum()])
            try:
                sums[3:-2] += mixer.score(images, prompts, metas, names)[0].double().sum(0)
            except rewards.RewardError as e:
                error, sums[-2] = e, sums[-2] + 1
    count, strict, score, *raw, failed, stopped = ppo.all_reduce_sum(sums).tolist()
    if stopped:
        return {}
    out = {"eval/heldout_strict": strict / count, "eval/heldout_score": score / count} if args.shapes_world else {}
    if failed:
        if ppo.rank() == 0:
            print(f"warning: held-out reward skipped: {error or 'it failed on another rank'}", file=sys.stderr)
    else:
        out.update({f"eval/heldout_{n}": r / count for n, r in zip(names, raw)})
    return out


@torch.no_grad()
def save_samples(args, backbone, policy_net, grid_metas, path, seeds=(0, 1), iteration=0):
    """A labelled grid of the deterministic sampler: one column per prompt (its text above it),
    one row per seed; in the built-in world each image is framed green (pass) or red (fail). Its
    heading names the run, model, algorithm, rewards and iteration (run_title)."""
    import grid
    with adapter(policy_net, POLICY) as net:
        images = rollout.sample_seeded(backbone, [m["prompt"] for m in grid_metas], seeds, args.eval_num_steps,
                                       batch=args.eval_batch, net=net)
    marks = None
    if args.shapes_world:
        import toy
        marks = toy.check(images, list(grid_metas) * len(seeds))[0].tolist()
    grid.save_grid(path, images, len(grid_metas), titles=[m["prompt"] for m in grid_metas], marks=marks,
                   row_titles=[f"seed {s}" for s in seeds],
                   heading=f"{run_title(args)}, iteration {iteration}: held-out prompts, deterministic sampler")


def run_title(args):
    """One line naming a train.py run: its directory, model, algorithm (and critic), rewards."""
    algo = args.algo + (f" (--critic {args.critic})" if args.algo == "ppo" and getattr(args, "critic", "learned")
                        != "learned" else "")
    return (f"{os.path.basename(os.path.normpath(args.run_dir))}: {algo} on {os.path.basename(args.model.rstrip('/'))}, "
            f"rewards {args.rewards}")


class Reporter:
    """--report-to: each metrics row also to tensorboard (RUN_DIR/tensorboard) or wandb, imported here,
    on use (neither is a dependency; configure() checks the package is there). Rank 0 only."""

    def __init__(self, args, start):
        self.kind, self.writer = args.report_to, None
        if self.kind == "tensorboard":            # purge_step: a resumed run drops the events logged after its checkpoint
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(args.run_dir, "tensorboard"), purge_step=start + 1 if start else None)
        elif self.kind == "wandb":                # one wandb run per run directory, continued on resume
            import wandb
            name = os.path.basename(os.path.abspath(args.run_dir))
            self.writer = wandb.init(project="critic-guided-diffusion", name=name, id=name, resume="allow",
                                     dir=args.run_dir, config=vars(args))

    def log(self, row):
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "iter"}
        if self.kind == "tensorboard":
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, global_step=row["iter"])
            self.writer.flush()
        elif self.kind == "wandb":
            self.writer.log(scalars, step=row["iter"])

    def close(self):
        if self.writer is not None:
            (self.writer.close if self.kind == "tensorboard" else self.writer.finish)()


def plot_rewards(run_dir, rows, title=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("reward/train/total_raw", "train reward (raw, weighted)"), ("reward/train/strict", "train strict accuracy")):
        have = [r for r in rows if key in r]
        if have:
            ax.plot([r["images"] for r in have], [r[key] for r in have], label=label, alpha=0.7)
    ev = [r for r in rows if "eval/heldout_strict" in r]
    if ev:
        ax.plot([r["images"] for r in ev], [r["eval/heldout_strict"] for r in ev], "o-", label="held-out strict accuracy")
    ax.set_xlabel("images generated"), ax.set_ylabel("reward / accuracy"), ax.grid(alpha=0.3), ax.legend()
    if rows:
        ax.set_title(f"{title}{', ' if title else ''}iteration {rows[-1]['iter']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "reward.png"), dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- the evaluation CLI

def build_parser():
    p = cli.Parser(description=__doc__.splitlines()[0])
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="base model: tiny-dit | tiny-unet | sd1.5 | sd3.5m | a diffusers "
                                                 "directory (default: the --policy run's, else tiny-dit)")
    g.add_argument("--policy", type=cli.nonempty, default=None, metavar="RUN_DIR",
                   help="a train.py run whose final policy to sample, or 'base' for --model itself (default: on the "
                        "built-in world, with no --critic either, the newest run under runs/ for --model; else the "
                        "base model)")
    g.add_argument("--critic", type=cli.nonempty, default=None, metavar="RUN_DIR",
                   help="a train.py critic-PPO run whose critic steers (default: --policy if it has one, else, on "
                        "the built-in world, the newest run under runs/ with a critic for --model)")
    g.add_argument("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device")
    cli.add_threads(g)
    g.add_argument("--mixed-precision", choices=tuple(PRECISIONS), default=None,
                   help="dtype of the model and reward weights: bf16 | fp16 | no (fp32) (default: bf16 on CUDA, no on CPU)")
    g.add_argument("--resolution", type=integer(8), default=None,
                   help="image side in pixels (default: the run's training size, else 512 for SD3.5-M, else native)")
    g.add_argument("--no-t5", action="store_true", default=None,
                   help="SD3: without the T5 encoder (default: as the run trained)")
    g = p.add_argument_group("steering")
    g.add_argument("--steer", default="none", choices=steer.METHODS, help="how to use the critic (steer.py)")
    g.add_argument("--n", type=integer(1), default=4,
                   help="samples / particles per prompt N (bon, smc, grad+bon, proxy-smc)")
    g.add_argument("--select", default="critic", choices=("critic", "reward"),
                   help="best of N by the critic's value of the last window state, or by the reward")
    g.add_argument("--guidance", type=finite_float(min=0), default=None,
                   help="grad, grad+bon: scale s of mu' = mu + s std^2 grad V (default: 8 on the built-in world, the "
                        "best of 1, 2, 4, 8, 16, 32 for grad+bon on its training prompts with `python train.py`'s "
                        "critic, BENCHMARKS 'Steering out of the box'; 1 on real models, whose critics' value scale "
                        "differs: sweep it on training prompts)")
    g.add_argument("--lam", type=finite_float(min=0), default=4.0,
                   help="smc: weights exp(lam (V(x') - V(x))), values in reward-std units")
    g.add_argument("--resample-every", type=integer(1), default=1,
                   help="smc: resampling opportunity every N window steps")
    g.add_argument("--no-compare", dest="compare", action="store_false",
                   help="do not also sample --steer none (same seeds and sampler) to print the steered figures beside "
                        "the unsteered ones (that costs one more image per prompt and seed)")
    g.add_argument("--steer-weights", default=None,
                   help="weights of the critic's heads (and of the rewards for --select reward), e.g. hps=1,clip=0.5 "
                        "(default: the critic run's training weights)")
    g = p.add_argument_group("sampling")
    g.add_argument("--num-steps", type=integer(1), default=None,
                   help="denoising steps K (default: the run's --num-steps, else 10)")
    g.add_argument("--sde-steps", type=integer(1), default=None,
                   help="stochastic steps S, the first of K: the critic's window (default: the run's, else 5)")
    g.add_argument("--noise-level", type=finite_float(min=0, max=1), default=None,
                   help="SDE noise a / DDIM eta, in [0, 1] as train.py's (default: the training noise)")
    g = p.add_argument_group("prompts and rewards")
    g.add_argument("--prompts", default="heldout",
                   help="heldout | train (the built-in world's split) | geneval (GenEval's 553 official prompts, "
                        "data/geneval; --seeds 4 is its protocol; written in its layout to OUT/geneval for the "
                        "official evaluator) | a .txt or .jsonl")
    g.add_argument("--max-prompts", type=integer(1), default=None, help="use only the first N prompts")
    g.add_argument("--rewards", default=None, help="comma list of rewards to report (default: shapes on the built-in "
                                                 "world, else the critic run's)")
    g.add_argument("--reward-path", action="append", default=[], metavar="NAME[.PART]=PATH", help="as in train.py")
    rewards.add_geneval_args(g)
    g.add_argument("--seeds", type=integer(1), default=4, help="seeds per prompt")
    g.add_argument("--eval-batch", type=integer(1), default=64,
                   help="prompts sampled (each with its N candidates) per call, per seed")
    g.add_argument("--out", type=cli.nonempty, default=None,
                   help="output directory (default runs/eval-STEER-MODEL-TIME); never overwritten")
    return p


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_config(run_dir, flag):
    path = os.path.join(run_dir or "", "config.json")
    if not os.path.isfile(path):
        fail(f"{flag} {run_dir}: not a train.py run directory (no config.json)")
    try:
        return cli.read_json(path)
    except cli.InputError as e:
        fail(f"{flag} {run_dir}: {e}")


def newest_run(model, holding="pipeline"):
    """The newest runs/*/ trained on `model` that holds `holding` (by default its exported policy: a finished
    run; checkpoint/critic.safetensors: one with a learned critic that steers, i.e. not one that reads the
    proxy, train.py --critic-proxy-input), or None."""
    found = []
    for cfg in glob.glob(os.path.join("runs", "*", "config.json")):
        run = os.path.dirname(cfg)
        try:
            config = json.load(open(cfg))
            same = config.get("model") == model and not (holding != "pipeline" and config.get("critic_proxy_input"))
        except (OSError, ValueError):
            continue
        path = os.path.join(run, holding)
        if same and os.path.exists(path):
            found.append((os.path.getmtime(path), run))
    return max(found)[1] if found else None


def load_prompts(source, max_prompts):
    if source in ("heldout", "train"):
        import toy
        metas = toy.prompts(source)
    elif source == "geneval":                      # the benchmark itself: GenEval's 553 official prompts
        metas = list(geneval.official())
    elif os.path.isfile(source):
        try:
            text = cli.read_text("--prompts", source)             # a binary file fails here, in one line
            metas = (geneval.read_metadata(source) if source.endswith(".jsonl") else
                     [{"prompt": line.strip()} for line in text.splitlines() if line.strip()])
        except cli.InputError as e:
            fail(str(e))
    else:
        fail(f"--prompts {source!r}: not heldout, train, geneval or an existing file")
    metas = metas[:max_prompts] if max_prompts else metas
    if not metas:
        fail(f"--prompts {source}: no prompts")
    return metas


def configure(args):
    """Every check before any model is loaded; fills in the defaults from the runs."""
    args.policy_source = "--policy" if args.policy else ""
    if args.policy is None and args.critic is None and (args.model or "tiny-dit") in ("tiny-dit", "tiny-unet"):
        args.policy = newest_run(args.model or "tiny-dit")                 # what `python train.py` just made
        args.policy_source = "the newest run under runs/ (--policy base: the shipped model)" if args.policy else ""
    args.policy = None if args.policy == "base" else args.policy
    policy_cfg = run_config(args.policy, "--policy") if args.policy else None
    args.model = args.model or (policy_cfg or {}).get("model") or "tiny-dit"
    try:
        _, kind = resolve(args.model)
    except cli.InputError as e:
        fail(str(e))
    shapes_world = kind == "ShapesPipeline"
    args.guidance = args.guidance if args.guidance is not None else (8.0 if shapes_world else 1.0)
    if args.policy:
        exported, lora = (os.path.join(args.policy, d) for d in ("pipeline", "policy_lora"))
        if not (os.path.isdir(exported) or os.path.isdir(lora)):
            fail(f"--policy {args.policy}: the run has no final policy yet (no pipeline/ or policy_lora/)")
        try:                                       # its configs and weights headers, as --model's
            if os.path.isdir(exported):
                resolve(exported, "--policy")
            for f in glob.glob(os.path.join(lora, "*.safetensors")):
                cli.safetensors_keys(f)
        except cli.InputError as e:
            fail(str(e) if os.path.isdir(exported) else f"--policy {args.policy}: {e}")
    wants_critic = steer.needs_critic(args.steer, args.select)
    args.critic_source = "--critic" if args.critic else ""
    if args.critic is None and wants_critic:
        if policy_cfg and os.path.isfile(os.path.join(args.policy, "checkpoint", "critic.safetensors")) and \
                not policy_cfg.get("critic_proxy_input"):
            args.critic, args.critic_source = args.policy, "the --policy run's own"
        elif shapes_world:
            args.critic = newest_run(args.model, os.path.join("checkpoint", "critic.safetensors"))
            args.critic_source = f"the newest run under runs/ with a critic for {args.model}"
        if args.critic is None:
            fail(f"--steer {args.steer} with --select {args.select} needs a critic: pass --critic RUN_DIR (a train.py "
                 f"--algo ppo run on {args.model}), or --select reward")
    critic_cfg = run_config(args.critic, "--critic") if args.critic else None
    if critic_cfg is not None:
        if not os.path.isfile(os.path.join(args.critic, "checkpoint", "critic.safetensors")):
            fail(f"--critic {args.critic}: no checkpoint/critic.safetensors (a --algo ppo run has one)")
        try:
            cli.safetensors_keys(os.path.join(args.critic, "checkpoint", "critic.safetensors"))
        except cli.InputError as e:
            fail(f"--critic {args.critic}: {e}")
        if critic_cfg.get("model") != args.model:
            fail(f"--critic {args.critic} was trained on {critic_cfg.get('model')}, not {args.model}")
        if wants_critic:
            try:
                check_loadable(critic_cfg, args.critic)
            except cli.InputError as e:
                fail(f"--critic {e}")
    if not wants_critic:
        args.critic = None                        # its run still sets the sampler's defaults below
    source = critic_cfg or policy_cfg or {}
    args.mixed_precision = args.mixed_precision or default_precision(args.device)
    if check_precision(args.mixed_precision, args.device):
        fail(check_precision(args.mixed_precision, args.device))
    args.resolution = args.resolution or source.get("resolution") or default_resolution(args.model)
    if check_resolution(args.model, args.resolution):
        fail(check_resolution(args.model, args.resolution))
    args.no_t5 = bool(source.get("no_t5")) if args.no_t5 is None else args.no_t5
    if args.no_t5 and kind != "StableDiffusion3Pipeline":
        fail(f"--no-t5: {args.model} is not an SD3 pipeline (only SD3 has a T5 encoder)")
    args.num_steps = args.num_steps or source.get("num_steps") or 10
    if args.sde_steps is not None and args.sde_steps > args.num_steps:          # as train.py: never clamped silently
        fail(f"--sde-steps {args.sde_steps} exceeds --num-steps {args.num_steps}")
    args.sde_steps = min(args.sde_steps or source.get("sde_steps") or 5, args.num_steps)
    # a critic trained on x_{t_1} too (train.py --critic-terminal) chooses there: the image is fixed
    args.terminal = bool((critic_cfg or {}).get("critic_terminal")) and args.sde_steps < args.num_steps
    args.critic_rewards = [r for r in (critic_cfg or {}).get("rewards", "").split(",") if r]
    args.rewards = args.rewards or ("shapes" if shapes_world else ",".join(args.critic_rewards) or "clip")
    names = [r.strip() for r in args.rewards.split(",") if r.strip()]
    if critic_cfg:                               # the critic run's training weights, one per head
        trained = [float(w) for w in (critic_cfg.get("reward_weights") or "").split(",") if w.strip()]
        weights = dict(zip(args.critic_rewards, trained or [1.0] * len(args.critic_rewards)))
    else:
        weights = {n: 1.0 for n in names[:1]}
    if args.steer_weights:
        try:
            weights = {k.strip(): float(v) for k, v in (kv.split("=") for kv in args.steer_weights.split(","))}
        except ValueError:
            fail(f"--steer-weights {args.steer_weights!r}: expected NAME=WEIGHT pairs, e.g. hps=1,clip=0.5")
        if critic_cfg and not set(weights) <= set(args.critic_rewards):
            fail(f"--steer-weights names {sorted(set(weights) - set(args.critic_rewards))}: the critic has heads for "
                 f"{', '.join(args.critic_rewards)} only")
    args.weights = weights
    args.reward_names = names + [n for n in weights if n not in names and args.select == "reward"]
    try:      # names and local weight paths checked here; nothing is loaded yet
        args.spec = rewards.parse_reward_args(argparse.Namespace(
            rewards=",".join(args.reward_names), reward_path=args.reward_path, geneval_threshold=args.geneval_threshold,
            geneval_counting_threshold=args.geneval_counting_threshold))
        args.metas = load_prompts(args.prompts, args.max_prompts)
        rewards.check_metadata(args.reward_names, args.metas, [m["prompt"] for m in args.metas])
    except rewards.RewardError as e:
        fail(str(e))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out = args.out or os.path.join("runs", f"eval-{args.steer}-{os.path.basename(args.model.rstrip('/'))}-{stamp}")
    args.out = os.path.normpath(args.out)
    if os.path.exists(args.out):
        fail(f"--out {args.out} exists; it is never overwritten")
    partial = args.out + PARTIAL
    if os.path.exists(partial) and not os.path.isfile(os.path.join(partial, PARTIAL_MARK)):
        fail(f"--out {args.out}: {partial} exists and is not an interrupted evaluation's; move it or choose another --out")
    blocked = cli.unwritable(args.out)
    if blocked:
        fail(f"--out {args.out}: {blocked} is not a writable directory")
    return args


def load_policy(args):
    """The sampling backbone: the run's exported pipeline (built-in world), or the base model with
    the run's LoRA adapter loaded by diffusers (real models), or the base model."""
    if args.policy and os.path.isdir(os.path.join(args.policy, "pipeline")):
        return load_backbone(os.path.join(args.policy, "pipeline"), args.device, **model_kwargs(args))
    backbone = load_backbone(args.model, args.device, **model_kwargs(args))
    if args.policy:
        backbone.pipe.load_lora_weights(os.path.join(args.policy, "policy_lora"))
    return backbone


def model_kwargs(args):
    return {"dtype": PRECISIONS[args.mixed_precision], "no_t5": args.no_t5, "resolution": args.resolution}


def evaluate(args):
    import critic as critic_module
    import grid
    # name -> fn(images, prompts, metadata); first, so a reward without its weights (offline) fails before any model loads
    scorers = args.spec.mixer(args.device, PRECISIONS[args.mixed_precision]).scorers
    backbone = load_policy(args)
    noise = args.noise_level if args.noise_level is not None else rollout.TRAIN_NOISE[backbone.sampler]
    metas, prompts = args.metas, [m["prompt"] for m in args.metas]
    if args.critic:
        critic_backbone = load_backbone(args.model, args.device, **model_kwargs(args))   # the base it was trained on
        critic = critic_module.load(critic_backbone, args.critic).eval()
        w = [args.weights.get(n, 0.0) for n in args.critic_rewards]
    # written into OUT.partial and renamed to --out at the end: once everything has loaded (a failure above
    # leaves no directory), and never a half-written --out (a killed evaluation's .partial is redone)
    work = args.out + PARTIAL
    shutil.rmtree(work, ignore_errors=True)       # configure() checked it is an interrupted evaluation's
    os.makedirs(work)
    open(os.path.join(work, PARTIAL_MARK), "w").close()

    def score(images, idx):                                               # the selection / proxy reward
        total = torch.zeros(len(images))
        for n, wn in args.weights.items():
            if n in scorers and wn:
                total += wn * torch.as_tensor(scorers[n](images, [prompts[i] for i in idx], [metas[i] for i in idx])).float().cpu()
        return total

    def sample(method, seed):
        """One seed of every prompt with a steering method: a Steered, --eval-batch prompts at a time."""
        value, chunks = None, []
        g = torch.Generator(args.device).manual_seed(seed)
        for c in range(0, len(prompts), args.eval_batch):
            part = prompts[c:c + args.eval_batch]
            if args.critic:
                value = steer.critic_value_fn(critic, critic_backbone, part, backbone.schedule(args.num_steps), w)
            chunks.append(steer.steer(backbone, part, method, args.n, args.num_steps, noise, args.sde_steps,
                                      value=value, score=lambda images, idx, c=c: score(images, idx + c),
                                      select=args.select, guidance=args.guidance, lam=args.lam,
                                      resample_every=args.resample_every, generator=g, terminal=args.terminal))
        return steer.Steered(**{f: torch.cat([getattr(o, f) for o in chunks]) for f in
                                ("images", "latents", "candidates", "chosen", "scores")},
                             nfe={k: sum(o.nfe[k] * len(o.chosen) for o in chunks) / len(prompts) for k in chunks[0].nfe})

    def judge(out, seed):
        """Every reward of the chosen images, one row per prompt."""
        per, rows = {}, []
        for n, fn in scorers.items():
            per[n] = torch.as_tensor(fn(out.images, prompts, metas)).float().cpu()
            per[n + "/strict"] = getattr(fn, "last_strict", None)
        for i, m in enumerate(metas):
            row = {"prompt": m["prompt"], "seed": seed, "chosen": int(out.chosen[i]), "nfe": out.nfe}
            for n in scorers:
                row[n] = per[n][i].item()
                if per[n + "/strict"] is not None:
                    row[n + "/strict"] = bool(per[n + "/strict"][i])
            rows.append(row)
        return rows

    def summarise(rows):
        out = {}
        for n in scorers:
            for key in (n, n + "/strict"):
                vals = torch.tensor([float(r[key]) for r in rows if key in r])
                if len(vals):
                    se = vals.std().item() / math.sqrt(len(vals)) if len(vals) > 1 else float("nan")
                    out[key] = {"mean": vals.mean().item(), "se": se, "images": len(vals)}
        return out

    rows, unsteered, grids = [], [], []
    for seed in range(args.seeds):
        out = sample(args.steer, seed)
        rows += judge(out, seed)
        if args.steer != "none" and args.compare:      # the same policy, seeds and sampler, unsteered: the gain's base
            unsteered += judge(sample("none", seed), seed)
        if seed == 0:
            grids.append(out)
        if args.prompts == "geneval" or args.prompts.endswith(".jsonl"):
            write_geneval(work, metas, out.images, seed)
    summary = summarise(rows)
    if unsteered:
        summary["unsteered"] = summarise(unsteered)
    summary["nfe_per_image"] = rows[0]["nfe"]
    config = {k: v for k, v in vars(args).items() if k not in ("metas", "spec")}
    write_json(os.path.join(work, "results.json"), {"config": config, "images": rows})
    write_json(os.path.join(work, "summary.json"), summary)
    save_candidates(args, work, grids[0], metas, scorers, grid)
    os.remove(os.path.join(work, PARTIAL_MARK))
    os.replace(work, args.out)
    return summary


def save_candidates(args, work, out, metas, scorers, grid):
    """grid.png: up to 8 prompts (columns) x N candidates of seed 0 (rows), the first reward under each."""
    cols = list(range(min(8, len(metas))))
    N = out.candidates.shape[1]
    images = out.candidates[cols].transpose(0, 1).reshape(-1, *out.candidates.shape[2:])     # (N * C, 3, H, W)
    first = next(iter(scorers))
    fn = scorers[first]
    flat_metas = [metas[c] for _ in range(N) for c in cols]
    vals = torch.as_tensor(fn(images, [m["prompt"] for m in flat_metas], flat_metas)).float()
    strict = getattr(fn, "last_strict", None)
    captions = [f"{first} {v:.2f}" + (" chosen" if N > 1 and int(out.chosen[c]) == k else "")
                for k in range(N) for c, v in zip(cols, vals[k * len(cols):(k + 1) * len(cols)].tolist())]
    marks = [bool(s) for s in strict] if strict is not None else None
    grid.save_grid(os.path.join(work, "grid.png"), images, len(cols), titles=[metas[c]["prompt"] for c in cols],
                   captions=captions, marks=marks, row_titles=[f"#{k}" for k in range(N)],
                   heading=f"--steer {args.steer} N={N} select={args.select} ({args.model}); seed 0")


def write_geneval(out, metas, images, seed):
    """GenEval's layout: out/geneval/NNNNN/metadata.jsonl and NNNNN/samples/SSSS.png."""
    from torchvision.utils import save_image
    for i, m in enumerate(metas):
        d = os.path.join(out, "geneval", f"{i:05d}")
        os.makedirs(os.path.join(d, "samples"), exist_ok=True)
        with open(os.path.join(d, "metadata.jsonl"), "w") as f:
            f.write(json.dumps(m) + "\n")
        save_image(images[i], os.path.join(d, "samples", f"{seed:04d}.png"))


def write_json(path, data):
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None):
    args = configure(build_parser().parse_args(argv))
    cli.set_threads(args.threads, args.device)
    try:
        summary = evaluate(args)
    except ValueError as e:                      # cli.InputError (models, rewards) and the steering's own checks
        fail(str(e).splitlines()[0])
    except KeyboardInterrupt:
        print(f"interrupted; nothing was written to {args.out} (rerun the same command)", file=sys.stderr)
        return 130
    nfe, unsteered = summary.pop("nfe_per_image"), summary.pop("unsteered", {})
    N = args.n if args.steer not in ("none", "grad") else 1
    print(f"{args.out}: --steer {args.steer} (N={N}" + (f", select {args.select}" if N > 1 else "")
          + (f", guidance {args.guidance:g}" if "grad" in args.steer else "") + f"), {len(args.metas)} prompts x "
          f"{args.seeds} seeds; per image: {nfe['denoiser']:.0f} denoiser passes, {nfe['critic_forward']:.0f} critic "
          f"forward, {nfe['critic_backward']:.0f} backward, {nfe['reward']:.0f} reward calls")
    print("  policy: " + (f"{args.policy} (its final policy; {args.policy_source})" if args.policy else
                          f"the base model {args.model}"))
    print(f"  critic: {args.critic} ({args.critic_source})" if args.critic else
          f"  critic: none (--steer {args.steer}" + (f" --select {args.select}" if N > 1 else "") + " reads no critic)")
    print(f"  sampler: {args.num_steps} steps, the first {args.sde_steps} stochastic (noise level "
          f"{args.noise_level if args.noise_level is not None else 'the training one'}), the rest deterministic"
          + ("; the critic chooses at x_(t_1), the last state" if args.terminal and N > 1 else ""))
    for key, s in summary.items():
        proxy = " [the in-process proxy (OWLv2 + CLIP), not the GenEval score]" if key.startswith("geneval") else ""
        line = f"  {key}{proxy}: {s['mean']:.4f} ± {s['se']:.4f} ({s['images']} images)"
        if key in unsteered:
            u = unsteered[key]
            line += (f"; unsteered (--steer none, same policy, seeds and sampler): {u['mean']:.4f} ± {u['se']:.4f}, "
                     f"gain {s['mean'] - u['mean']:+.4f}")
        print(line)
    if os.path.isdir(os.path.join(args.out, "geneval")):
        print(official_geneval_commands(args.out))


def official_geneval_commands(out):
    """How to score OUT/geneval with GenEval's official evaluator (its repository, with the detector its
    evaluation/download_models.sh fetches): the figure to put beside published GenEval numbers."""
    images, results = os.path.join(out, "geneval"), os.path.join(out, "geneval_results.jsonl")
    return ("GenEval's layout is in " + images + "; the official score (from a clone of github.com/djghosh13/geneval):\n"
            f"  python evaluation/evaluate_images.py {images} --outfile {results} --model-path MODELS_DIR\n"
            f"  python evaluation/summary_scores.py {results}")


if __name__ == "__main__":
    sys.exit(main())
