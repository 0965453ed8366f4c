"""Throughput of one training iteration per model on one GPU, at the 8-GPU run's per-rank sizes:
one rollout batch (images/s), the critic's value pass and one PPO update (policy and critic), on
full-size random weights (--size full; weights do not change the cost) in bf16 with gradient
checkpointing, as the runbook's command trains. Reports seconds per iteration, images/s, the peak
GPU memory (torch.cuda.max_memory_allocated) and MFU: the model FLOPs of the iteration (counted by
torch.utils.flop_counter on one denoiser pass, forward alone and forward + backward, then
multiplied out; checkpointing's recompute is not counted, as MFU does not) over the time, over
the GPU's dense bf16 peak (PEAK_TFLOPS; --peak-tflops for another GPU).
Not included: reward scoring (bench/reward_cost.py), the text encoders (prompts are encoded once
per run and cached, so they cost nothing per iteration; T5 is left out: no tokenizer offline).

Run:  python bench/gpu_throughput.py --size full    (a CUDA GPU; writes bench/results/gpu_throughput.json
                                                     and the 'gpu-throughput' section of BENCHMARKS.md)
      python bench/gpu_throughput.py --size tiny    (the same code at tiny sizes on the CPU: a smoke run,
                                                     tested in tests/test_gpu_paths.py; writes only --out)
"""
import argparse
import os
import sys
import tempfile
import time

import torch

from common import ROOT, machine, resolved_config, write_json, write_section

sys.path.insert(0, os.path.join(ROOT, "tests"))
import memory  # noqa: E402

# dense bf16 tensor-core peaks from the vendors' data sheets (sparsity doubles them; not used here)
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.1,
               "RTX 4090": 165.2}


def peak_tflops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def full_pipeline(model, device, tmp):
    """A diffusers pipeline of the full-size architecture (bench/memory.py's configs), random weights,
    built on `device` (a GPU initialises 2.5B weights in seconds), no T5; a character-level CLIP
    tokenizer (tests/tiny.py) stands in for the real one (the cost does not depend on the ids)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline
    from tiny import write_clip_tokenizer
    tok = write_clip_tokenizer(os.path.join(tmp, "tok"))
    tok.model_max_length = 77
    parts = memory.components(model, device, t5=False)
    if model == "sd3.5m":
        return StableDiffusion3Pipeline(transformer=parts["transformer"], vae=parts["vae"],
                                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                        text_encoder=parts["text_encoder (CLIP-L)"], tokenizer=tok,
                                        text_encoder_2=parts["text_encoder_2 (CLIP-G)"], tokenizer_2=tok,
                                        text_encoder_3=None, tokenizer_3=None)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder (CLIP-L)"], tokenizer=tok,
                                   unet=parts["unet"], scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def run_config(model, tiny_path, tmp):
    """train.py's resolution of the model's 8-GPU run (WORLD_SIZE=8): the per-rank sizes timed here.
    Tiny: 3 steps and minibatches of 6 pairs, so that the smoke run takes seconds."""
    argv = ["--model", tiny_path or model, "--rewards", "jpeg", "--device", "cpu", "--gradient-checkpointing",
            "--run-dir", os.path.join(tmp, "run")]
    if tiny_path:
        argv += ["--num-steps", "3", "--eval-num-steps", "3", "--minibatch-size", "48"]
    return resolved_config(argv)


def denoiser_flops(backbone, net, cond):
    """(forward, forward + backward) FLOPs of one denoiser pass on one state, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, *backbone.latent_shape, device=backbone.device)
    t = backbone.schedule(10).timesteps[:1]
    with FlopCounterMode(display=False) as fwd, torch.no_grad():
        backbone.predict(x, t, cond.index(torch.tensor([0])), net=net)
    was = getattr(net, "gradient_checkpointing", False)
    net.disable_gradient_checkpointing() if was else None           # the model's FLOPs, not the recompute
    with FlopCounterMode(display=False) as train_pass:
        backbone.predict(x, t, cond.index(torch.tensor([0])), net=net).pow(2).mean().backward()
    net.enable_gradient_checkpointing() if was else None
    net.zero_grad(set_to_none=True)
    return fwd.get_total_flops(), train_pass.get_total_flops()


def measure(model, size, device, tmp):
    import ppo
    import rollout
    import train
    from critic import POLICY, adapter
    from models import Backbone, load_backbone
    tiny_path = None
    if size == "tiny":
        from tiny import make_tiny_sd15, make_tiny_sd3
        tiny_path = (make_tiny_sd3 if model == "sd3.5m" else make_tiny_sd15)(os.path.join(tmp, model))
    args = run_config(model, tiny_path, tmp)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.mixed_precision = "bf16" if device.type == "cuda" else "no"
    if tiny_path:
        backbone = load_backbone(tiny_path, device, dtype)
    else:
        pipe = full_pipeline(model, device, tmp).to(device, dtype)
        backbone = Backbone(pipe, model, device, dtype, args.resolution)
    policy_net, ref_net, critic, opt_policy, opt_critic = train.build(args, backbone, 1)
    prompts = [f"a photo of {n} red cats" for n in range(args.batch_per_rank)]
    cond = backbone.encode(prompts)
    flops_fwd, flops_train = denoiser_flops(backbone, policy_net, cond)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    noise = rollout.TRAIN_NOISE[backbone.sampler]
    gen = torch.Generator(device).manual_seed(0)
    shuffle = torch.Generator().manual_seed(0)

    def iteration():
        times = {}
        sync(), torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
        t0 = time.perf_counter()
        with adapter(policy_net, POLICY) as net:
            traj = rollout.sample(backbone, prompts, args.num_steps, noise, generator=gen, net=net,
                                  sde_steps=args.sde_steps, cond=cond)
        sync()
        times["rollout_s"] = time.perf_counter() - t0
        B, K = len(prompts), args.sde_steps
        t0 = time.perf_counter()
        with torch.no_grad():
            old_values, features = critic.values(backbone, traj, keep_features=True, steps=K)
        sync()
        times["value_pass_s"] = time.perf_counter() - t0
        reward = traj.images.float().mean((1, 2, 3))[:, None].cpu()                   # stands in for the rewards
        adv, returns = ppo.gae(reward, old_values.cpu())
        advantages = ppo.normalise(adv.sum(-1), torch.ones(B, K)).clamp(-args.adv_clip, args.adv_clip)
        t0 = time.perf_counter()
        logs = ppo.update(backbone, traj, advantages.to(device), returns.to(device), old_values, policy_net, ref_net,
                          critic, opt_policy, opt_critic, args, shuffle, critic_pairs=args.critic_pairs,
                          features=(*features, returns.reshape(B * K, -1).to(device), old_values.reshape(B * K, -1)))
        sync()
        times["update_s"] = time.perf_counter() - t0
        times["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        times["ratio_dev_first"] = logs["losses/ratio_dev_first"]
        return times

    iteration()                                                    # warm-up (kernels, allocator)
    r = iteration()
    B, K, S = len(prompts), args.num_steps, args.sde_steps
    flops = (B * K * flops_fwd + B * S * flops_fwd                   # rollout, value pass (the VAE decode not counted)
             + B * S * args.epochs * flops_train + args.critic_pairs * flops_train)   # policy, critic backbone
    total = r["rollout_s"] + r["value_pass_s"] + r["update_s"]
    peak = peak_tflops(device)
    return {**r, "iteration_s": total, "images_per_s_rollout": B / r["rollout_s"], "images_per_s_iteration": B / total,
            "flops_per_iteration": flops, "denoiser_flops_forward": flops_fwd, "denoiser_flops_train": flops_train,
            "mfu": flops / total / (peak * 1e12) if peak else None, "peak_tflops": peak,
            "per_rank": {k: getattr(args, k) for k in ("batch_per_rank", "num_steps", "sde_steps", "minibatch_per_rank",
                                                        "critic_pairs", "resolution", "lora_rank")}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("full", "tiny"), default="full", help="full-size random weights (GPU) or tiny (CPU)")
    p.add_argument("--models", default="sd3.5m,sd1.5", help="comma list: sd3.5m, sd1.5")
    p.add_argument("--device", default=None, help="default: cuda for --size full, cpu for tiny")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in PEAK_TFLOPS")
    p.add_argument("--out", default=None, help="JSON path (default, full size: bench/results/gpu_throughput.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if args.size == "full" else "cpu"))
    if args.size == "full" and device.type != "cuda":
        p.exit(2, "error: --size full needs a CUDA GPU (use --size tiny on a CPU)\n")
    if args.peak_tflops:
        PEAK_TFLOPS[torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"] = args.peak_tflops
    out = {"machine": machine() + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
           "command": "python bench/gpu_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "size": args.size, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            out["models"][model] = measure(model, args.size, device, tmp)
            print(model, out["models"][model], flush=True)
    if args.out or args.size == "full":
        write_json((args.out or os.path.join("bench", "results", "gpu_throughput.json")).removesuffix(".json"), out)
    if args.size == "full":
        write_section("gpu-throughput", report(out))
    print(report(out).split("\n\n")[-1])
    return out


def report(out):
    rows = ["| model | images/s (rollout) | s / iteration | rollout / value pass / update (s) | peak GB | MFU "
            "| first update's max abs(ratio - 1) |", "|---|---|---|---|---|---|---|"]
    for model, r in out["models"].items():
        mfu = f"{100 * r['mfu']:.1f}% of {r['peak_tflops']:g} TFLOPs" if r["mfu"] is not None else "n/a"
        rows.append(f"| {model} | {r['images_per_s_rollout']:.2f} | {r['iteration_s']:.2f} | {r['rollout_s']:.2f} / "
                    f"{r['value_pass_s']:.2f} / {r['update_s']:.2f} | "
                    f"{'n/a' if r['peak_gb'] is None else format(r['peak_gb'], '.1f')} | {mfu} | {r['ratio_dev_first']:.1e} |")
    first = next(iter(out["models"].values()))["per_rank"]
    return (f"## GPU throughput of one training iteration (full-size random weights)\n\nCommand: `{out['command']}` on "
            f"{out['machine']}. Per rank, as on 8 GPUs: {first}; bf16, gradient checkpointing, rewards and text "
            "encoders excluded (module docstring). MFU: model FLOPs (torch's flop counter, recompute excluded) over "
            "time over the GPU's dense bf16 peak.\n\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
