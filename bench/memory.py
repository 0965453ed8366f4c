"""GPU memory per rank of the design card's run (torchrun --nproc_per_node=8 train.py --model sd3.5m
--rewards hps,clip), from exact parameter counts and measured activations; no GPU needed.

Parameter counts: the full-size SD3.5-M and SD1.5 components (and the HPSv2.1 / CLIP reward models,
open_clip ViT-H-14) are built from their published configs (below, as in the hub repos' config.json)
on the `meta` device: exact counts, no weights, offline. LoRA adapters are counted on those modules
by peft's own target rule (critic.lora_config's targets).
Activations: a REDUCED-depth, full-width SD3.5-M transformer (3 blocks: one dual-attention block,
one plain, and the last, context-pre-only one: the three kinds of SD3.5-M's 24) with the policy's
LoRA, in bf16, runs a real forward and backward on the CPU at the training resolution; every
tensor autograd saves for backward is counted once (torch.autograd.graph.saved_tensors_hooks,
parameters excluded) and attributed to its block, then scaled to 24 blocks and the minibatch.
With gradient checkpointing a block keeps only its inputs (image and text tokens, bf16) and one
block at a time holds its activations again while it is recomputed and back-propagated through.
Per-rank sizes come from train.configure with WORLD_SIZE=8 (the run's own arithmetic).

Run:  python bench/memory.py   (CPU, ~1 minute; writes bench/results/memory.json and the 'memory'
      section of BENCHMARKS.md)
"""
import argparse
import time

import torch

from common import machine, resolved_config, write_json, write_section

GB = 1e9
# stabilityai/stable-diffusion-3.5-medium: transformer/, vae/, text_encoder{,_2,_3}/config.json
SD35M_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35M_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
                 use_quant_conv=False, use_post_quant_conv=False)
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_G_TEXT = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
# stable-diffusion-v1-5/stable-diffusion-v1-5: unet/, vae/, text_encoder/config.json
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32)
SD15_VAE = dict(SD35M_VAE, latent_channels=4, sample_size=512, scaling_factor=0.18215, shift_factor=None,
                use_quant_conv=True, use_post_quant_conv=True)
# the design card's reward models: HPSv2.1 and CLIP, both open_clip ViT-H-14 (rewards.py)
REWARD_ARCHS = {"hps": "ViT-H-14", "clip": "ViT-H-14"}


def components(model, device="meta", t5=True):
    """{name: module} of a full-size pipeline's components, built on `device` (SD3.5-M: T5 if t5)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    with torch.device(device):
        if model == "sd3.5m":
            return {"transformer": SD3Transformer2DModel(**SD35M_TRANSFORMER), "vae": AutoencoderKL(**SD35M_VAE),
                    "text_encoder (CLIP-L)": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L_TEXT)),
                    "text_encoder_2 (CLIP-G)": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_TEXT)),
                    **({"text_encoder_3 (T5-XXL)": T5EncoderModel(T5Config(**T5_XXL))} if t5 else {})}
        return {"unet": UNet2DConditionModel(**SD15_UNET), "vae": AutoencoderKL(**SD15_VAE),
                "text_encoder (CLIP-L)": CLIPTextModel(CLIPTextConfig(**{k: v for k, v in CLIP_L_TEXT.items()
                                                                         if k != "projection_dim"}))}


def count(module):
    return sum(p.numel() for p in module.parameters())


def lora_count(net, sampler, rank):
    """Parameters of one LoRA adapter of `rank` on net: r x (in + out) for every nn.Linear peft would
    target (its rule: the module's name is a target or ends with '.' + a target)."""
    from critic import lora_config
    targets = lora_config(type("B", (), {"sampler": sampler})(), rank).target_modules
    return sum(rank * (m.in_features + m.out_features) for name, m in net.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))


def value_head_count(dim, temb_dim, rewards):
    from critic import ValueHead
    with torch.device("meta"):
        return count(ValueHead(dim, temb_dim, rewards))


def reward_count(arch):
    import open_clip
    return count(open_clip.create_model(arch, device="meta"))


def saved_activations(resolution, text_tokens, rank):
    """Bytes autograd saves per block kind, for one sample: a 3-block, full-width SD3.5-M transformer
    in bf16 with a rank-r policy adapter (fp32, trainable, as train.build makes it), real forward and
    backward on the CPU. Returns ({dual, plain, last, outside}: bytes, seconds)."""
    from diffusers import SD3Transformer2DModel
    from critic import lora_config
    torch.manual_seed(0)
    config = dict(SD35M_TRANSFORMER, num_layers=3, dual_attention_layers=(0,))
    net = SD3Transformer2DModel(**config).to(torch.bfloat16).requires_grad_(False)
    net.add_adapter(lora_config(type("B", (), {"sampler": "flow"})(), rank, 2 * rank))
    for name, p in net.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen, where, saved = set(), ["outside"], {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            saved[where[0]] = saved.get(where[0], 0) + storage.nbytes()
        return t

    for name, block in zip(("dual", "plain", "last"), net.transformer_blocks):
        block.register_forward_pre_hook(lambda m, a, name=name: where.__setitem__(0, name))
        block.register_forward_hook(lambda m, a, o: where.__setitem__(0, "outside"))
    side = resolution // 8
    x = torch.randn(1, 16, side, side, dtype=torch.bfloat16)
    text = torch.randn(1, text_tokens, 4096, dtype=torch.bfloat16)
    pooled = torch.randn(1, 2048, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.tensor([500.0]),
                  return_dict=False)[0]
    out.float().pow(2).mean().backward()
    return saved, time.perf_counter() - t0


INFERENCE = """
import sys, torch
sys.path.insert(0, {bench!r})
from memory import SD35M_TRANSFORMER, SD35M_VAE
torch.set_num_threads(1)
what, n, side = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) // 8
with torch.no_grad():
    if what == "decode":            # SD3.5-M's VAE, n latents to n images
        from diffusers import AutoencoderKL
        net = AutoencoderKL(**SD35M_VAE).to(torch.bfloat16)
        x = torch.randn(n, 16, side, side, dtype=torch.bfloat16)
        run = lambda: net.decode(x, return_dict=False)[0]
    else:                           # 3 full-width SD3.5-M blocks: inference keeps one block's transients
        from diffusers import SD3Transformer2DModel
        net = SD3Transformer2DModel(**dict(SD35M_TRANSFORMER, num_layers=3, dual_attention_layers=(0,))).to(torch.bfloat16)
        x = torch.randn(n, 16, side, side, dtype=torch.bfloat16)
        text, pooled = torch.randn(n, 333, 4096, dtype=torch.bfloat16), torch.randn(n, 2048, dtype=torch.bfloat16)
        run = lambda: net(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.full((n,), 500.0))
    status = lambda key: int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key)))   # KiB
    open("/proc/self/clear_refs", "w").write("5")       # Linux: the high-water mark restarts from the current RSS
    before = status("VmRSS:")
    if n:
        run()
    print(status("VmHWM:") - before)                     # KiB above the weights and inputs
"""


def inference_peak(what, n, resolution):
    """Bytes of transient activations (peak RSS above the loaded weights and inputs, in a fresh process whose
    high-water mark is reset once they are loaded: Linux's /proc/self/clear_refs) of an
    inference pass over n images at `resolution`: what='decode' (SD3.5-M's VAE) or 'denoise' (its blocks)."""
    import os
    import subprocess
    import sys
    code = INFERENCE.format(bench=os.path.dirname(os.path.abspath(__file__)))
    kib = lambda k: int(subprocess.run([sys.executable, "-c", code, what, str(k), str(resolution)], check=True,
                                       capture_output=True, text=True).stdout.split()[-1])
    return (kib(n) - kib(0)) * 1024


def per_rank_config():
    """train.py's own resolved configuration of the design card's command on 8 ranks."""
    import tempfile
    return resolved_config(["--model", "sd3.5m", "--rewards", "jpeg", "--device", "cpu", "--run-dir", tempfile.mkdtemp()])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target-gb", type=float, default=60.0, help="per-rank budget to report against")
    args = p.parse_args()
    cfg = per_rank_config()
    out = {"machine": machine(), "command": "python bench/memory.py", "config": {
        k: getattr(cfg, k) for k in ("world_size", "batch_per_rank", "num_steps", "sde_steps", "minibatch_per_rank",
                                     "critic_pairs", "lora_rank", "resolution", "eval_batch")}, "params": {}}
    for model in ("sd3.5m", "sd1.5"):
        parts = components(model)
        net = parts.get("transformer", parts.get("unet"))
        sampler = "flow" if model == "sd3.5m" else "ddim"
        out["params"][model] = {name: count(m) for name, m in parts.items()}
        out["params"][model]["lora_r32_adapter"] = lora_count(net, sampler, cfg.lora_rank)
    for name, arch in REWARD_ARCHS.items():
        out["params"][f"reward {name} ({arch})"] = reward_count(arch)
    P = out["params"]["sd3.5m"]
    head = value_head_count(1536, 1536, 2)
    B, K, mb = cfg.batch_per_rank, cfg.sde_steps, cfg.minibatch_per_rank
    tokens_img, tokens_txt = (cfg.resolution // 16) ** 2, 77 + 256           # CLIP 77 + T5 256 (zeros with --no-t5)
    saved, seconds = saved_activations(cfg.resolution, tokens_txt, cfg.lora_rank)
    out["activations_measured"] = {"bytes_per_sample": saved, "seconds": seconds, "blocks": "3 of 24, full width"}
    # per sample, 24 blocks: 13 dual-attention, 10 plain, the last context-pre-only
    full = 13 * saved["dual"] + 10 * saved["plain"] + saved["last"] + saved.get("outside", 0)
    block_inputs = (tokens_img + tokens_txt) * 1536 * 2                         # bf16 tokens entering a block
    ckpt = 24 * block_inputs + saved.get("outside", 0) + 2 * saved["dual"]       # + one block recomputed, and its gradients
    rewards_gb = sum(v for k, v in out["params"].items() if k.startswith("reward")) * 2 / GB
    encoders = sum(v for k, v in P.items() if k.startswith("text_encoder")) * 2 / GB
    adapters = 2 * P["lora_r32_adapter"]                                        # policy + critic on the one base
    terms = {
        "denoiser base, bf16 (policy, reference and critic share it)": P["transformer"] * 2 / GB,
        "LoRA adapters policy + critic, fp32": adapters * 4 / GB,
        "their gradients (fp32) and AdamW states (2 x fp32)": adapters * 12 / GB,
        "value head (2 rewards), fp32 + gradients + AdamW": head * 16 / GB,
        "VAE, bf16": P["vae"] * 2 / GB,
        "reward models hps + clip (2 x ViT-H-14), bf16": rewards_gb,
        "critic features kept from the value pass (B x K x 1024 x 1536, fp32)": B * K * tokens_img * 1536 * 4 / GB,
        "trajectories (latents, means, x0-hat: fp32) and prompt embeddings (bf16)":
            (B * (3 * K + 1) * 16 * tokens_img * 4 * 4 + 2 * B * tokens_txt * 4096 * 2) / GB,
    }
    static = sum(terms.values())
    out["terms_gb"] = terms
    out["activations_gb"] = {"with_checkpointing": mb * ckpt / GB, "without": mb * full / GB}
    out["encoders_gb"] = encoders
    # evaluation: --eval-batch images sampled at once (no gradients: one block's transients at a time), then
    # decoded Backbone.DECODE_CHUNK at a time; measured per image on 2 images, scaled linearly
    from models import Backbone
    decode = inference_peak("decode", 2, cfg.resolution) / 2
    denoise = inference_peak("denoise", 2, cfg.resolution) / 2
    out["evaluation_measured"] = {"decode_bytes_per_image": decode, "denoise_bytes_per_image": denoise,
                                  "decode_chunk": Backbone.DECODE_CHUNK, "eval_batch": cfg.eval_batch}
    evaluation = max(cfg.eval_batch * denoise, Backbone.DECODE_CHUNK * decode) / GB
    out["phases_gb"] = {
        "prompt caching (text encoders on the GPU, then moved off)": P["transformer"] * 2 / GB + P["vae"] * 2 / GB
        + rewards_gb + encoders,
        "policy update, --gradient-checkpointing": static + mb * ckpt / GB,
        "policy update, no checkpointing": static + mb * full / GB,
        f"held-out evaluation (--eval-batch {cfg.eval_batch}, decoded {Backbone.DECODE_CHUNK} at a time)": static + evaluation,
    }
    phases = list(out["phases_gb"].values())
    out["peak_gb"] = {"with_checkpointing": max(phases[0], phases[1], phases[3]), "without": max(phases)}
    base_w = P["transformer"] * 2
    out["one_base_ratio"] = {"weights": (base_w + adapters * 4 + head * 4) / base_w,
                             "with_gradients_and_adam": (base_w + adapters * 16 + head * 16) / base_w}
    out["targets"] = {"per_rank_gb": args.target_gb, "one_base_ratio": 1.2}
    write_json("memory", out)
    for k, v in out.items():
        if k != "params":
            print(k, v)
    write_section("memory", report(out))


def report(out):
    c, P = out["config"], out["params"]
    fmt = lambda n: f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"
    rows = ["| model | component | parameters |", "|---|---|---|"]
    for model in ("sd3.5m", "sd1.5"):
        rows += [f"| {model} | {k} | {fmt(v)} |" for k, v in P[model].items()]
    rows += [f"| rewards | {k[7:]} | {fmt(v)} |" for k, v in P.items() if k.startswith("reward")]
    terms = ["| per rank | GB |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in out["terms_gb"].items()]
    a = out["activations_gb"]
    terms += [f"| activations of one policy minibatch ({c['minibatch_per_rank']} pairs, {c['resolution']} px), "
              f"gradient checkpointing | {a['with_checkpointing']:.2f} |",
              f"| the same without checkpointing | {a['without']:.2f} |"]
    phases = ["| phase | GB per rank |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in out["phases_gb"].items()]
    m, e = out["activations_measured"], out["evaluation_measured"]
    per = ", ".join(f"{k} {v / 2 ** 20:.0f} MiB" for k, v in m["bytes_per_sample"].items())
    peak, ratio, t = out["peak_gb"], out["one_base_ratio"], out["targets"]
    ok = lambda good: "met" if good else "MISSED"
    return f"""## Memory per rank of the 8-GPU run (SD3.5-M, analytic, parameter counts exact)

Command: `{out['command']}` on {out['machine']}. Configuration: train.py's own resolution of
`--model sd3.5m --rewards hps,clip` on {c['world_size']} ranks: {c['batch_per_rank']} images x {c['sde_steps']}
trained steps per rank, policy minibatches of {c['minibatch_per_rank']} (trajectory, step) pairs, the critic's
backbone on {c['critic_pairs']} pairs, LoRA rank {c['lora_rank']}, {c['resolution']} px, `--mixed-precision bf16`.
Parameters: full-size components built from their published configs on the `meta` device (exact).
Activations: bytes autograd saves in a real bf16 forward + backward, on the CPU, of a 3-block full-width
SD3.5-M transformer with the policy adapter, per sample ({per}, measured in {m['seconds']:.0f} s),
scaled to 24 blocks (13 dual-attention, 10 plain, 1 last) and the minibatch; with checkpointing, 24 blocks'
bf16 input tokens plus one dual block's activations twice (recomputed, and its gradients while it is
back-propagated). Evaluation: the transient activations of an inference pass, measured as the peak memory
of a fresh process above its loaded weights (bf16, CPU) for 2 images at {c['resolution']} px: SD3.5-M's VAE
decode ({e['decode_bytes_per_image'] / GB:.2f} GB per image; `Backbone.decode` takes {e['decode_chunk']} at a time, where
one call over all {c['eval_batch']} would hold {c['eval_batch'] * e['decode_bytes_per_image'] / GB:.0f} GB) and the
denoiser's blocks ({e['denoise_bytes_per_image'] / GB:.3f} GB per image, {c['eval_batch']} images at once). Not modelled:
the CUDA context and allocator slack (~1-3 GB).

{chr(10).join(rows)}

{chr(10).join(terms)}

{chr(10).join(phases)}

- Peak per rank: **{peak['with_checkpointing']:.1f} GB** with `--gradient-checkpointing`, {peak['without']:.1f} GB
  without; target <= {t['per_rank_gb']:.0f} GB: {ok(peak['with_checkpointing'] <= t['per_rank_gb'])} with checkpointing,
  {ok(peak['without'] <= t['per_rank_gb'])} without.
- Policy + critic + reference on one base: **{ratio['weights']:.3f}x** one base's bf16 weights (adapters and head,
  fp32), {ratio['with_gradients_and_adam']:.3f}x with their gradients and AdamW states; target <= {t['one_base_ratio']}x:
  {ok(ratio['weights'] <= t['one_base_ratio'])} ({ok(ratio['with_gradients_and_adam'] <= t['one_base_ratio'])} with the optimiser).
- The text encoders ({out['encoders_gb']:.1f} GB in bf16, T5-XXL most of it) are on the GPU only while every
  prompt is encoded once (`Backbone.cache_prompts`), then moved to the CPU; `--no-t5` leaves T5 unloaded.
- Not yet checked on a GPU: no GPU was lent to this project so far (`bench/gpu_throughput.py --size full`,
  one step of `bench/gpu_check.sh`, measures the peak with `torch.cuda.max_memory_allocated`)."""


if __name__ == "__main__":
    main()
