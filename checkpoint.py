"""Checkpoints, resume and export of a train.py run: what lets a run stop anywhere and continue
exactly (the same metrics as an unbroken run), and what it leaves for other tools. Not in the
paper (METHOD.md says nothing of it); every RL trainer needs it.

  resumed_config()   --resume RUN_DIR: the run's config.json, with only RESUMABLE flags new
  claim_run_dir()    a new run directory never overwrites another run; a run stopped before its
                     first checkpoint starts again; a resume must have iterations left
  save_checkpoint()  checkpoint/ replaced whole (policy.safetensors, critic.safetensors, state.pt:
                     optimisers, reward statistics, fp16 loss scales; rng_rank{r}.pt per rank),
                     refused if a weight is NaN or inf
  resume()           weights, optimisers, reward statistics, every RNG stream, metrics.jsonl cut
                     back to the checkpoint
  export_final()     pipeline/ (a diffusers directory, LoRA merged) and/or policy_lora/

Test: tests/test_train.py (resume, exports), tests/test_inputs.py (damaged checkpoints, stopped runs)
"""
import argparse
import datetime
import json
import os
import random
import shutil

import numpy as np
import torch

import cli
import ppo
from critic import POLICY
from models import geometry

# flags a resumed run may change; every other one comes from the run's config.json
RESUMABLE = ("iters", "resume", "device", "eval_every", "sample_every", "save_every", "print_config", "report_to",
             "eval_batch", "gradient_checkpointing", "dist_timeout", "threads")


class ConfigError(cli.InputError):
    """Bad flags or paths: printed as one line, exit code 2, before any work."""


class NonFiniteError(RuntimeError):
    """Weights about to be saved hold NaN or inf: nothing is written, the last good checkpoint stays."""


def refuse_non_finite(tensors, what):
    """Raise NonFiniteError naming the first non-finite tensor of a {name: tensor} state."""
    for name, t in tensors.items():
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteError(f"{what}: {name} holds NaN or inf; not saved (the last good checkpoint is kept)")


def explicit_flags(parser, argv):
    """The dests of the flags actually typed (to tell a resumed run's config from new flags)."""
    for a in parser._actions:
        a.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def resumed_config(args, argv, build_parser):
    """The args of the run --resume names: its config.json, with only the RESUMABLE flags taken from
    the command line (argv); each check a ConfigError before any work."""
    path = os.path.join(args.resume, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--resume {args.resume}: no run to resume there (no config.json)")
    given = explicit_flags(build_parser(), argv)
    changed = given - set(RESUMABLE)
    if changed:
        allowed = ", ".join("--" + f.replace("_", "-") for f in RESUMABLE if f != "resume")
        raise ConfigError(f"--resume takes its config from {path}; only {allowed} may be given, "
                          f"not {', '.join(sorted('--' + f.replace('_', '-') for f in changed))}")
    config = cli.read_json(path)
    # each rank resumes its own random streams (checkpoint/rng_rank{r}.pt): another world size has none to resume
    world = int(os.environ.get("WORLD_SIZE", 1))
    if config.get("world_size", 1) != world:
        raise ConfigError(f"--resume {args.resume}: the run trained on {config.get('world_size', 1)} process(es), "
                          f"not {world}; resume it with the same world size")
    ckpt = find_checkpoint(args.resume)
    if world > 1 and ckpt and not all(os.path.isfile(os.path.join(ckpt, f"rng_rank{r}.pt")) for r in range(world)):
        raise ConfigError(f"--resume {args.resume}: its checkpoint holds no RNG states of all {world} ranks")
    config.setdefault("sde_steps", config.get("num_steps"))  # runs from before the flag trained every step
    config.setdefault("mixed_precision", "no")               # ... and before these, in fp32 at the native size
    config.setdefault("resolution", geometry(config.get("model", "tiny-dit"))[0])
    config.setdefault("critic_replay_states", "all")          # ... and before this one, replaying every state
    config = {**vars(build_parser().parse_args([])), **config}   # other flags newer than the run: defaults
    for key in RESUMABLE:
        if key in given or key not in config:
            config[key] = getattr(args, key)
    config["run_dir"] = args.resume
    build_parser().check_values(config, path)                    # a hand edit gets the flags' own checks
    args = argparse.Namespace(**config)
    return args


def claim_run_dir(args):
    """The run directory, never overwritten: a new one (runs/ALGO-MODEL-TIME by default), or this very
    run rerun by the same command (then args.resume is set and it continues from its checkpoint, or
    starts again if it stopped before the first), or the --resume run; the run continued must have
    iterations left to do. Else a ConfigError."""
    if not args.resume:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.run_dir = args.run_dir or os.path.join("runs", f"{args.algo}-{os.path.basename(args.model.rstrip('/'))}-{stamp}")
        cfg_path = os.path.join(args.run_dir, "config.json")
        if os.path.isfile(cfg_path):
            world = cli.read_json(cfg_path).get("world_size", 1)
            if world != args.world_size:
                raise ConfigError(f"--run-dir {args.run_dir}: the run trained on {world} process(es), not "
                                  f"{args.world_size}; continue it with the same world size")
            old, new = strip(cli.read_json(cfg_path)), strip(vars(args))
            if old != new:
                newer = sorted(new.keys() - old.keys())              # flags added to train.py after the run began
                if newer and all(old[k] == new.get(k) for k in old):
                    raise ConfigError(f"--run-dir {args.run_dir} was made by a train.py older than "
                                      f"{', '.join('--' + k.replace('_', '-') for k in newer)}: if this command "
                                      f"sets none of them, continue the run with --resume {args.run_dir} (it keeps "
                                      "what the run did before them); else give another --run-dir")
                raise ConfigError(f"--run-dir {args.run_dir} already holds a different run (never overwritten)")
            # the same command again (a requeued job, torchrun --max-restarts, a rerun by hand): the flags are the
            # run's own, so continue it where it stopped, as --resume would
            args.resume = args.run_dir
        elif os.path.isdir(args.run_dir) and os.listdir(args.run_dir):
            raise ConfigError(f"--run-dir {args.run_dir} is not empty and holds no run (never overwritten)")
    blocked = cli.unwritable(args.run_dir)
    if blocked:
        raise ConfigError(f"--run-dir {args.run_dir}: {blocked} is not a writable directory")
    if args.resume:
        done = checkpoint_iteration(args.run_dir, critic=args.algo == "ppo" and args.critic == "learned")
        if done >= args.iters and not (done == args.iters and not exported(args.run_dir)):   # else: export it again
            raise ConfigError(f"{args.run_dir}: the run is already at iteration {done}, "
                              f"{'its last' if done == args.iters else 'past'} --iters {args.iters}: nothing to do; "
                              f"pass --iters N with N > {done} to continue it")


def exported(run_dir):
    """Whether a run has written its final policy (export_final): pipeline/ or policy_lora/."""
    return any(os.path.isdir(os.path.join(run_dir, d)) for d in ("pipeline", "policy_lora"))


def find_checkpoint(run_dir):
    """A run's checkpoint directory: checkpoint/, or checkpoint.old/ when a save was cut off between
    its two renames (save_checkpoint); None before the first save."""
    for name in ("checkpoint", "checkpoint.old"):
        if os.path.isdir(os.path.join(run_dir, name)):
            return os.path.join(run_dir, name)
    return None


def checkpoint_iteration(run_dir, critic):
    """The iteration a run's checkpoint holds (0 before the first save: --resume starts the run from
    its config.json), once each of its files reads back (safetensors headers, state.pt); a damaged
    one is a ConfigError naming the file and whether an older checkpoint is there to fall back on."""
    path = find_checkpoint(run_dir)
    if path is None:
        return 0
    try:
        for name in ["policy.safetensors"] + (["critic.safetensors"] if critic else []):
            cli.safetensors_keys(os.path.join(path, name))
        state = os.path.join(path, "state.pt")
        try:
            return int(torch.load(state, map_location="cpu", weights_only=True, mmap=True)["iteration"])
        except Exception as e:                    # missing, truncated (a zip without its directory), no iteration
            raise cli.InputError(f"{state}: not a loadable checkpoint state "
                                 f"({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    except cli.InputError as e:
        older = os.path.join(run_dir, "checkpoint.old")
        fallback = (f"{older} holds the checkpoint before it: move it to {os.path.join(run_dir, 'checkpoint')} to "
                    "resume from there" if path != older and os.path.isdir(older) else
                    "no older checkpoint is kept (each save replaces the last): start a new run")
        raise ConfigError(f"--resume {run_dir}: {e}; {fallback}") from None


def strip(config):
    """A run's identity: its config without what a resume may change or what is derived."""
    return {k: v for k, v in config.items() if k not in RESUMABLE + ("run_dir",)}


def policy_state(args, policy_net):
    if args.lora_rank:
        from peft import get_peft_model_state_dict
        return get_peft_model_state_dict(policy_net, adapter_name=POLICY)
    return policy_net.state_dict()


def load_policy_state(args, policy_net, state):
    if args.lora_rank:
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(policy_net, state, adapter_name=POLICY)
    else:
        policy_net.load_state_dict(state)


def save_checkpoint(args, it, images, policy_net, critic, opt_policy, opt_critic, mixer, rngs, replay=()):
    """checkpoint/ is replaced whole: written to checkpoint.tmp/, then swapped in with renames, so a
    crash at any point leaves the previous checkpoint intact (resume also reads checkpoint.old/).
    Called on every rank: each writes its own RNG states (rng_rank{r}.pt; the ranks draw different
    prompts and noise, so one rank's states replayed everywhere would make the ranks' batches
    identical after a resume), and its value head's replay (train.py --critic-replay: each rank's own
    states); rank 0 writes the rest and swaps."""
    from safetensors.torch import save_file
    final, tmp, old = (os.path.join(args.run_dir, n) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    policy = policy_state(args, policy_net)
    refuse_non_finite(policy, f"iteration {it}: the policy")      # the same weights on every rank: all refuse
    critic = critic if critic is not None and critic.learned else None     # the controls (--critic none, ...) hold nothing
    critic_state = critic.state_dict_to_save() if critic is not None else {}
    refuse_non_finite(critic_state, f"iteration {it}: the critic")
    rank = ppo.rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    ppo.barrier()                                      # tmp/ exists before any rank writes into it
    torch.save(rngs(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    if replay:                                         # (tokens, temb[, text][, proxy], returns, old_values) kept
        save_file({f"{i}.{j}": t.contiguous() for i, batch in enumerate(replay) for j, t in enumerate(batch)},
                  os.path.join(tmp, f"replay_rank{rank}.safetensors"))
    ppo.barrier()                                      # every rank's RNG file is in tmp/ before the swap
    if rank != 0:
        return
    save_file({k: v.detach().contiguous().cpu() for k, v in policy.items()}, os.path.join(tmp, "policy.safetensors"))
    if critic is not None:
        save_file({k: v.cpu() for k, v in critic_state.items()}, os.path.join(tmp, "critic.safetensors"))
    state = {"iteration": it, "images": images, "mixer": mixer.state_dict(),
             "opt_policy": opt_policy.state_dict(), "opt_critic": opt_critic.state_dict() if opt_critic else None,
             "loss_scale": {k: o.loss_scale.state_dict() for k, o in (("policy", opt_policy), ("critic", opt_critic))
                            if hasattr(o, "loss_scale")}}                   # fp16's loss scales
    torch.save(state, os.path.join(tmp, "state.pt"))
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(args, policy_net, critic, opt_policy, opt_critic, mixer):
    from safetensors.torch import load_file
    path = find_checkpoint(args.run_dir)
    load_policy_state(args, policy_net, load_file(os.path.join(path, "policy.safetensors")))
    if critic is not None and critic.learned:
        critic.load_saved(load_file(os.path.join(path, "critic.safetensors")))
    # on the CPU: every rank would otherwise put rank 0's optimiser states on cuda:0 (where they were saved); the
    # optimisers move them onto their parameters' device, and a GPU run resumes on a CPU-only machine too
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    opt_policy.load_state_dict(state["opt_policy"])
    if opt_critic is not None:
        opt_critic.load_state_dict(state["opt_critic"])
    for key, opt in (("policy", opt_policy), ("critic", opt_critic)):
        if key in state.get("loss_scale", {}):
            opt.loss_scale.load_state_dict(state["loss_scale"][key])
    mixer.load_state_dict(state["mixer"])
    rng_path = os.path.join(path, f"rng_rank{ppo.rank()}.pt")
    if os.path.isfile(rng_path):                   # this rank's own RNG states (older one-rank runs: in state.pt)
        state["rngs"] = torch.load(rng_path, map_location="cpu", weights_only=True)
    return state


def export_final(args, backbone, policy_net):
    """The trained policy in a form other tools load: a diffusers pipeline directory (full copies,
    and LoRA on the built-in world merged: `--model RUN/pipeline` works everywhere) or a LoRA
    adapter for pipe.load_lora_weights."""
    from peft import get_peft_model_state_dict
    shapes_lora = args.lora_rank and not hasattr(type(backbone.pipe), "save_lora_weights")
    if not args.lora_rank or shapes_lora:
        key = "transformer" if getattr(backbone.pipe, "transformer", None) is not None else "unet"
        net = merged_policy(policy_net) if shapes_lora else policy_net
        pipe = type(backbone.pipe)(**{**backbone.pipe.components, key: net})
        tmp = os.path.join(args.run_dir, "pipeline.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(os.path.join(args.run_dir, "pipeline"), ignore_errors=True)
        os.replace(tmp, os.path.join(args.run_dir, "pipeline"))
        if not shapes_lora:
            return os.path.join(args.run_dir, "pipeline")
    layers = get_peft_model_state_dict(policy_net, adapter_name=POLICY)
    out = os.path.join(args.run_dir, "policy_lora")
    if hasattr(type(backbone.pipe), "save_lora_weights"):
        # with the adapter's config (r, lora_alpha, targets) as metadata: without it, load_lora_weights
        # rebuilds the adapter with alpha = r, i.e. at r / alpha of the trained strength (half, at alpha = 2r)
        key = "transformer" if backbone.sampler == "flow" else "unet"
        metadata = policy_net.peft_config[POLICY].to_dict()          # r, lora_alpha, target modules
        type(backbone.pipe).save_lora_weights(out, **{f"{key}_lora_layers": layers, f"{key}_lora_adapter_metadata": metadata},
                                              safe_serialization=True)
    else:                                          # a ShapesPipeline has no LoRA loader: the raw adapter,
        from safetensors.torch import save_file     # beside pipeline/ with the adapter merged in (above)
        os.makedirs(out, exist_ok=True)
        save_file({k: v.contiguous() for k, v in layers.items()}, os.path.join(out, "adapter.safetensors"))
    return out + (" and " + os.path.join(args.run_dir, "pipeline") if shapes_lora else "")


def merged_policy(net):
    """A plain copy of a LoRA-carrying net with the policy adapter merged into its weights
    (W + scale B A) and the other adapters dropped: what `--model RUN/pipeline` loads."""
    import copy
    from peft.tuners.tuners_utils import BaseTunerLayer
    merged = copy.deepcopy(net)
    for name, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[POLICY])
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent) if parent else merged, child, module.get_base_layer())
    merged._hf_peft_config_loaded = False
    merged.__dict__.pop("peft_config", None)
    return merged


def rng_states(prompt_rng, gen, shuffle):
    """Every random stream of this rank: Python's, NumPy's, torch's, the prompt draws, the rollout
    noise (gen) and the minibatch order (shuffle)."""
    states = {"python": random.getstate(), "numpy": [torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
                                                     *np.random.get_state()[2:]],
              "torch": torch.get_rng_state(), "prompt": prompt_rng.getstate(), "gen": gen.get_state(),
              "shuffle": shuffle.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():     # this rank's GPU's default stream too
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def resume(args, policy_net, critic, opt_policy, opt_critic, mixer, prompt_rng, gen, shuffle, master, replay=None):
    """Load the run's checkpoint into the nets, optimisers, reward statistics, random streams and
    the value head's replay (a deque, filled in place), and drop the metrics logged after it.
    Returns (iteration, images seen, the metrics rows kept)."""
    state = load_checkpoint(args, policy_net, critic, opt_policy, opt_critic, mixer)
    replay_path = os.path.join(find_checkpoint(args.run_dir), f"replay_rank{ppo.rank()}.safetensors")
    if replay is not None and os.path.isfile(replay_path):
        from safetensors.torch import load_file
        saved = load_file(replay_path)
        batches = sorted({int(k.split(".")[0]) for k in saved})
        width = sum(k.startswith("0.") for k in saved)             # 4 tensors per batch, +1 each: text, proxy
        for i in batches:
            replay.append(tuple(saved[f"{i}.{j}"] for j in range(width)))
    r = state["rngs"]
    random.setstate((r["python"][0], tuple(r["python"][1]), r["python"][2]))
    np.random.set_state(("MT19937", r["numpy"][0].numpy().astype(np.uint32), *r["numpy"][1:]))
    torch.set_rng_state(r["torch"]), gen.set_state(r["gen"]), shuffle.set_state(r["shuffle"])
    if "cuda" in r and torch.cuda.is_available():
        torch.cuda.set_rng_state(r["cuda"])
    prompt_rng.setstate((r["prompt"][0], tuple(r["prompt"][1]), r["prompt"][2]))
    # rank 0 alone reads the metrics (only it logs them) and drops the lines logged after the checkpoint,
    # rewriting the file whole (a rename): another rank reading while it is rewritten in place would see half a file
    rows, metrics = [], os.path.join(args.run_dir, "metrics.jsonl")
    if master and os.path.isfile(metrics):
        rows = [json.loads(line) for line in open(metrics)]
        rows = [row for row in rows if row["iter"] <= state["iteration"]]
        with open(metrics + ".tmp", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        os.replace(metrics + ".tmp", metrics)
    return state["iteration"], state["images"], rows
