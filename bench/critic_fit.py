"""Fitting the critic on the built-in world: how close train.py's critic training gets to the
ceiling of bench/value_ceiling.py, with and without --critic-replay (METHOD.md section 3, 8).

The policy is held at the base model (tiny-dit), so the critic's targets are stationary and the
comparison is about fitting alone. One stream of --iters rollout batches of 32 trajectories
(training prompts, 10 steps, SDE window 5: train.py's defaults; --sde-steps sets the window) is generated once; each variant
fits a fresh critic (LoRA r16 'critic' adapter + value head, as train.py builds it) through
ppo.update(train_policy=False), train.py's own critic step: value warm-up on every pair for 2
iterations, then the backbone on 16 pairs per iteration (--critic-fraction 0.1) and the head on
the states of the last M batches (--critic-replay M). Every 20 iterations, the explained variance
of V_phi against the returns of 8 fresh batches (held out), per state of the window and at the last
state x_{t_1} (trained only by the --critic-terminal variant), and the same on 8 batches of the
held-out prompts, which the critic never sees (steering is measured on those).

Run:  python bench/critic_fit.py                 # writes bench/results/critic_fit.json (~8 min, 2 threads;
                                                 # with --variants, the others' figures are kept there)
      python bench/critic_fit.py --variants "M=32, head lr 1e-4" --save DIR
          # keeps that critic in DIR (config.json, checkpoint/critic.safetensors, critic_fit.json), a run
          # directory without a policy: bench/steering.py --run DIR steers the base model with it
"""
import argparse
import collections
import itertools
import json
import os
import shlex
import shutil
import sys
import time

import torch

from common import RESULTS, write_json

MODEL, RANK, ALPHA = "tiny-dit", 16, 32      # the base model and the critic adapter, as train.py's defaults build them;
                                             # --save writes the same values, so critic.load rebuilds this critic

# name: (--critic-replay M, --critic-head-lr, --critic-lr, backbone pairs per iteration (0 = frozen), --head-epochs,
#        also fit the last state x_{t_1}, whose return is fixed after the window: its ceiling is EV 1 (--critic-terminal),
#        the head also reads the prompt's text tokens (--critic-text))
VARIANTS = {
    "today (M=1, head lr 1e-3)": (1, 1e-3, 1e-4, 16, 1, False, False),
    "M=32, head lr 1e-4": (32, 1e-4, 1e-4, 16, 1, False, False),
    "M=64, head lr 1e-4": (64, 1e-4, 1e-4, 16, 1, False, False),
    "M=32, head lr 1e-4, 2 head epochs": (32, 1e-4, 1e-4, 16, 2, False, False),
    "M=16, head lr 1e-4, frozen backbone": (16, 1e-4, 1e-4, 0, 1, False, False),
    "M=16, head lr 1e-3": (16, 1e-3, 1e-4, 16, 1, False, False),
    "M=32, head lr 3e-4": (32, 3e-4, 1e-4, 16, 1, False, False),
    "M=32, head lr 1e-4, with x_t1": (32, 1e-4, 1e-4, 16, 1, True, False),
    "M=32, head lr 1e-4, with x_t1, text tokens": (32, 1e-4, 1e-4, 16, 1, True, True),
    "M=32, head lr 3e-4, with x_t1, text tokens": (32, 3e-4, 1e-4, 16, 1, True, True),
    "M=32, head lr 1e-4, with x_t1, text tokens, frozen backbone": (32, 1e-4, 1e-4, 0, 1, True, True),
}


def main():
    import critic as C
    import ppo
    import rewards
    import toy
    from models import load_backbone
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=60, help="rollout batches of 32 each critic is fitted on")
    p.add_argument("--variants", default="all", help="names of VARIANTS separated by semicolons, or all")
    p.add_argument("--save", metavar="DIR", help="keep the fitted critic of the one variant named in DIR (a new "
                   "directory), for bench/steering.py; its figures then go to DIR/critic_fit.json, not bench/results")
    p.add_argument("--sde-steps", type=int, default=5, help="the rollouts' stochastic window S of the 10 steps (train.py's "
                   "--sde-steps): the states the critic fits; steering with the saved critic uses the same sampler")
    args = p.parse_args()
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(";")
    if args.iters < 20 or any(n not in VARIANTS for n in names):
        p.exit(2, f"error: --iters must be >= 20 and --variants among: {', '.join(VARIANTS)}\n")
    if not 1 <= args.sde_steps <= 9:
        p.exit(2, f"error: --sde-steps must be in 1..9 (the window of 10 steps, with a state after it), got {args.sde_steps}\n")
    if args.save and (len(names) != 1 or os.path.exists(args.save)):
        p.exit(2, f"error: --save needs one variant and a directory that does not exist yet ({args.save})\n")
    score, K, S = rewards.build_reward("shapes"), 10, args.sde_steps

    def stream(seed, n, split="train"):
        g = torch.Generator().manual_seed(seed)
        return list(itertools.islice(C.rollouts(load_backbone(MODEL), toy.prompts(split), score, 32, K, S, g), n))

    # fresh rollouts of the training prompts, and of the held-out prompts the critic never sees
    data, held, unseen = stream(0, args.iters), stream(1, 8), stream(2, 8, "heldout")
    norm = rewards.RunningNorm(1)
    G = [norm.normalise(R.float()[:, None]) for _, R in data]     # train.py's scaling, updated per iteration
    mean, std = norm.mean[0].float(), norm.std()[0].float()
    out = {}
    for name in names:
        M, head_lr, lr, pairs, head_epochs, terminal, text = VARIANTS[name]
        F = S + 1 if terminal else S                 # the states fitted: the window, and x_{t_1} with terminal
        torch.manual_seed(0)
        backbone = load_backbone(MODEL)
        critic = C.Critic(backbone, 1, lora=True, rank=RANK, alpha=ALPHA, text=text)
        opt = torch.optim.AdamW(critic.param_groups(lr, head_lr), weight_decay=0.0)
        flags = argparse.Namespace(head_epochs=head_epochs, minibatch_per_rank=80, vf_clip=0.0, max_grad_norm=1.0,
                                   epochs=1, clip_range=1e-2, kl_coef=0.0)
        replay, gen, curve, t0 = collections.deque(maxlen=M), torch.Generator().manual_seed(0), [], time.time()
        for it, ((traj, _), g) in enumerate(zip(data, G)):
            old, inputs = critic.values(backbone, traj, keep_features=True, steps=S, last=terminal)  # (32, F, 1)
            returns = g[:, None, :].expand(32, F, 1).contiguous()                             # gamma = lambda = 1: G = R
            replay.append((*inputs, returns.reshape(-1, 1), old.reshape(-1, 1)))
            # as train.py: the backbone learns on the window's pairs, the head on all F states
            ppo.update(backbone, traj, torch.zeros(32, S), returns, old, None, None, critic, None, opt, flags, gen,
                       train_policy=False, critic_pairs=None if it < 2 else pairs,
                       features=[torch.cat(t) for t in zip(*replay)])
            if (it + 1) % 20 == 0:     # every state of the window, and x_{t_1} (fitted or not)
                ev, ev_unseen = (evs(critic, backbone, batches, mean, std, S) for batches in (held, unseen))
                curve.append({"iters": it + 1, "heldout_ev_by_state": ev[:S], "heldout_ev_last_state": ev[S],
                              "unseen_prompts_ev_by_state": ev_unseen[:S], "unseen_prompts_ev_last_state": ev_unseen[S]})
                print(f"{name}, {it + 1} batches: held-out EV by state " + " ".join(f"{x:+.3f}" for x in ev)
                      + " | on held-out prompts " + " ".join(f"{x:+.3f}" for x in ev_unseen)
                      + f" ({time.time() - t0:.0f} s)", flush=True)
        out[name] = curve
    command = "python " + shlex.join(sys.argv)
    if args.save:
        save(args.save, critic, {"command": command, "variants": out}, VARIANTS[names[0]], K, S)
        print("kept the critic in", args.save)
    else:   # the variants not run now keep their figures, each beside the command that measured it
        print("written", write_json("critic_fit", merged(out, command)))


def merged(out, command):
    """bench/results/critic_fit.json's figures with this run's variants replaced: {"variants": {name: curve},
    "commands": {name: the command that measured it}}."""
    path = os.path.join(RESULTS, "critic_fit.json")
    old = json.load(open(path)) if os.path.exists(path) else {"variants": {}}
    commands = old.get("commands") or {name: old.get("command") for name in old["variants"]}
    return {"variants": {**old["variants"], **out}, "commands": {**commands, **{name: command for name in out}}}


def evs(critic, backbone, batches, mean, std, S):
    """Explained variance of V_phi against the standardised returns of rollout batches, at each
    state of the window and at the last state x_{t_1} (S + 1 figures)."""
    import critic as C
    values = torch.cat([critic.values(backbone, t, steps=S, last=True)[..., 0] for t, _ in batches])  # (N, S+1)
    target = ((torch.cat([R for _, R in batches]).float() - mean) / std)[:, None].expand_as(values)
    return [C.explained_variance(values[:, k], target[:, k]) for k in range(S + 1)]


def save(run_dir, critic, figures, variant, K, S):
    """A run directory of the critic alone, in train.py's layout (critic.load reads it), written
    under a temporary name and renamed: the policy is the base model itself (no pipeline/)."""
    from safetensors.torch import save_file
    from checkpoint import refuse_non_finite
    state = {k: v.cpu() for k, v in critic.state_dict_to_save().items()}
    refuse_non_finite(state, "the fitted critic")
    tmp = run_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "checkpoint"))
    save_file(state, os.path.join(tmp, "checkpoint", "critic.safetensors"))
    M, head_lr, lr, pairs, head_epochs, terminal, text = variant
    config = {"model": MODEL, "rewards": "shapes", "lora_rank": RANK, "lora_alpha": ALPHA,
              "num_steps": K, "sde_steps": S, "critic_replay": M, "critic_head_lr": head_lr, "critic_lr": lr,
              "critic_pairs": pairs, "head_epochs": head_epochs, "critic_terminal": terminal, "critic_text": text,
              "fitted_by": "bench/critic_fit.py (policy: the base model)"}
    for name, data in (("config.json", config), ("critic_fit.json", figures)):
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(data, f, indent=1)
    os.replace(tmp, run_dir)


if __name__ == "__main__":
    main()
