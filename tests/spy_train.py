"""train.py under torchrun, watched (for tests/test_train.py): every tensor collective must be
made by ppo.collective (the one helper that moves tensors to the device the backend serves; a
call from anywhere else raises), and each rank's training draws (its prompts and its initial
noise, and the state of its global torch RNG) are appended to $SPY_DIR/rank{r}.jsonl, one line per rollout, and the prompts of its
deterministic samples (evaluation, grids) to rank{r}_eval.jsonl; a rank other than 0 that opens
metrics.jsonl raises. SPY_CLOCK_SKEW (below) sets the ranks' clocks apart.

Run: torchrun --nproc_per_node 2 tests/spy_train.py TRAIN_FLAGS..."""
import hashlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch.distributed as dist  # noqa: E402

import ppo  # noqa: E402
import rollout  # noqa: E402
import train  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_gather_object", "broadcast_object_list")


def watch(name, fn):
    def spied(*args, **kwargs):
        caller = sys._getframe(1).f_code
        if caller is not ppo.collective.__code__:
            raise RuntimeError(f"dist.{name} called from {caller.co_name} ({caller.co_filename}:{caller.co_firstlineno}),"
                               f" not through ppo.collective")
        for t in [a for a in args if hasattr(a, "device")] + [x for a in args if isinstance(a, list) for x in a]:
            if t.device != ppo.comm_device(t.device):
                raise RuntimeError(f"dist.{name} got a tensor on {t.device}, which the backend does not serve")
        return fn(*args, **kwargs)
    return spied


for name in COLLECTIVES:
    setattr(dist, name, watch(name, getattr(dist, name)))

sample = rollout.sample


def recorded(backbone, prompts, num_steps, noise_level, *args, **kwargs):
    traj = sample(backbone, prompts, num_steps, noise_level, *args, **kwargs)
    if noise_level:                                # a training rollout (evaluation and grids run at 0)
        with open(os.path.join(os.environ["SPY_DIR"], f"rank{os.environ['RANK']}.jsonl"), "a") as f:
            f.write(json.dumps({"prompts": list(prompts), "noise": traj.latents[:, 0].flatten()[:8].tolist(),
                                "torch_rng": hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()}) + "\n")
    else:
        with open(os.path.join(os.environ["SPY_DIR"], f"rank{os.environ['RANK']}_eval.jsonl"), "a") as f:
            f.write(json.dumps({"prompts": list(prompts)}) + "\n")
    return traj


rollout.sample = recorded

# only rank 0 reads or writes metrics.jsonl (a resume rewrites it: a rank reading meanwhile would see half a file)
if os.environ["RANK"] != "0":
    import builtins  # noqa: E402
    _open = builtins.open

    def guarded(file, *args, **kwargs):
        if str(file).endswith("metrics.jsonl"):
            raise RuntimeError(f"rank {os.environ['RANK']} opened {file}: only rank 0 may")
        return _open(file, *args, **kwargs)
    builtins.open = guarded

# SPY_CLOCK_SKEW=S: rank r's clock reads r x S seconds late, as ranks that start on either side of a second, or
# nodes whose clocks differ, read them; the default run directory is named by the time
if os.environ.get("SPY_CLOCK_SKEW"):
    import datetime  # noqa: E402
    import types  # noqa: E402

    import checkpoint  # noqa: E402

    class Skewed(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime.now(tz) + datetime.timedelta(seconds=float(os.environ["SPY_CLOCK_SKEW"])
                                                                  * int(os.environ["RANK"]))
    checkpoint.datetime = types.SimpleNamespace(datetime=Skewed)
sys.exit(train.main(sys.argv[1:]))
