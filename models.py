"""Backbones by name: one interface over the built-in tiny models and SD1.5 / SD3.5-M.

Every backbone is a diffusers pipeline loaded with `from_pretrained` (a hub name or a local
directory), wrapped in `Backbone`, which gives the rest of the code what METHOD.md
sections 1-3 need and nothing more:
  sampler            'flow' (velocity prediction, SD3-style DiT) or 'ddim' (epsilon, UNet)
  encode(prompts)    text conditioning, with the unconditional ("") embedding for CFG
  predict(x_t, t, c) the denoiser's output (velocity or epsilon), optionally with CFG
  features(x_t,t,c)  the last hidden tokens and the timestep embedding (the critic reads these)
  decode(x0)         images (B, 3, H, W) in [0, 1]
  schedule(K)        the K-step grid of timesteps and noise levels, from the checkpoint's own
                     diffusers scheduler (never hand-typed tables)

Names: tiny-dit, tiny-unet (the built-in shapes world, see toy.py; shipped under
checkpoints/), sd1.5, sd3.5m, or a path to a diffusers directory of one of these kinds.
Precision (PRECISIONS): the frozen weights in bf16 / fp16 / fp32; whatever trains is kept in fp32
by train.py, and every net is fed in its own dtype (Backbone._call). Prompt embeddings are cached
per prompt (Backbone.encode), so the text encoders can leave the accelerator (offload_text_encoders).

| paper (METHOD.md) | here |
|---|---|
| the prompt c, and CFG's "" branch | Cond(cond, uncond) from Backbone.encode(prompts) |
| v_theta (2b), eps_theta (2a) | Backbone.predict(x_t, t, cond, cfg_scale) -> (B, C, H, W), fp32 |
| t_K > ... > t_0; sigma (2b), abar (2a) | schedule(K) -> Schedule.timesteps (K,), .levels (K+1,); step j is k = K - j |
| the critic's features, noise-level embedding (3) | Backbone.features(x_t, t, cond) -> tokens (B, N, D), temb (B, E) |
| decode(x_0), which R judges (1) | Backbone.decode(x0) -> (B, 3, H, W) in [0, 1] |
| not the paper's: the pretraining loss RAFT trains with (9) | denoising_loss(sampler, scheduler, net, x0, kw) |

Test: tests/test_models.py, tests/test_gpu_paths.py.
"""
import functools
import json
import os
from dataclasses import dataclass

import torch

from cli import InputError, check_pipeline

ROOT = os.path.dirname(os.path.abspath(__file__))
MODELS = {
    "tiny-dit": os.path.join(ROOT, "checkpoints", "tiny-dit"),
    "tiny-unet": os.path.join(ROOT, "checkpoints", "tiny-unet"),
    "sd1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd3.5m": "stabilityai/stable-diffusion-3.5-medium",
}
# pipeline class in model_index.json -> sampler family
KINDS = {"StableDiffusion3Pipeline": "flow", "StableDiffusionPipeline": "ddim", "ShapesPipeline": None}
# --mixed-precision -> the dtype of the frozen weights (denoiser base, text encoders, VAE, reward models)
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
# the hub models' geometry, for flag checks that load nothing: native pixels, the pixel step a size
# must be a multiple of (VAE factor 8 x patch 2 / x the UNet's 8x downsampling), the largest size
GEOMETRY = {"sd3.5m": (1024, 16, 384 * 2 * 8), "sd1.5": (512, 64, None)}


def check_precision(name, device):
    """None, or why --mixed-precision `name` cannot run on `device` (fp16 needs a GPU: diffusers' pipelines,
    and many CPU kernels, do not run fp16 on the CPU)."""
    if name == "fp16" and torch.device(device).type == "cpu":
        return "--mixed-precision fp16 needs a GPU (the CPU has no fp16 kernels for these models); use bf16 or no"
    return None


def default_precision(device):
    """bf16 on CUDA (the peers' choice), fp32 elsewhere (CPU bf16 is slow and gains no memory that matters)."""
    return "bf16" if torch.device(device).type == "cuda" else "no"


def geometry(name_or_path):
    """(native pixels, pixel step, largest pixels or None) of a model, from its configs alone."""
    if name_or_path in GEOMETRY:
        return GEOMETRY[name_or_path]
    path, _ = resolve(name_or_path)
    read = lambda sub: json.load(open(os.path.join(path, sub, "config.json")))
    net = read("transformer") if os.path.isdir(os.path.join(path, "transformer")) else read("unet")
    factor = 2 ** (len(read("vae")["block_out_channels"]) - 1)
    if "patch_size" in net:                   # SD3 transformer: whole patches, inside its position table
        return net["sample_size"] * factor, factor * net["patch_size"], net["pos_embed_max_size"] * net["patch_size"] * factor
    return net["sample_size"] * factor, factor * 2 ** (len(net["block_out_channels"]) - 1), None


def default_resolution(name_or_path):
    """The training size: 512 px for SD3-kind models whose native size is 1024 (SD3.5-M; the peers
    train it at 512), the native size otherwise."""
    native = geometry(name_or_path)[0]
    return 512 if native == 1024 and resolve(name_or_path)[1] == "StableDiffusion3Pipeline" else native


def check_resolution(name_or_path, pixels):
    """None if the model can sample pixels x pixels, else why not (one line)."""
    _, step, largest = geometry(name_or_path)
    if pixels % step:
        return f"--resolution {pixels}: must be a multiple of {step} for {name_or_path}"
    if largest and pixels > largest:
        return f"--resolution {pixels}: {name_or_path}'s position table reaches {largest} px"
    return None


class BackboneError(InputError):
    """Bad model name, path or checkpoint; the CLIs print its one line and exit 2."""


def __getattr__(name):
    """models.ShapesPipeline is defined on first use (shapes_pipeline())."""
    if name != "ShapesPipeline":
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return shapes_pipeline()


@functools.cache
def shapes_pipeline():
    """The ShapesPipeline class. It subclasses diffusers' DiffusionPipeline, and importing diffusers
    takes seconds that an entry point refusing a bad flag should not spend: defined on first use."""
    from diffusers import DiffusionPipeline

    class ShapesPipeline(DiffusionPipeline):
        """The built-in world's pipeline: a latent denoiser (an SD3 transformer or a UNet), the
        world's AutoencoderKL, a tiny CLIP text encoder and a word-level tokenizer, as SD3 / SD1.5
        pipelines hold them. Saved and loaded with diffusers' own save_pretrained / from_pretrained."""
        _optional_components = ["transformer", "unet"]

        def __init__(self, text_encoder, tokenizer, scheduler, vae, transformer=None, unet=None):
            super().__init__()
            self.register_modules(text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae,
                                  transformer=transformer, unet=unet)

        @torch.no_grad()
        def encode_prompt(self, prompts, device):
            ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(device)
            out = self.text_encoder(ids)
            return out.last_hidden_state, out.text_embeds         # (B, L, D), (B, P)

    ShapesPipeline.__module__, ShapesPipeline.__qualname__ = __name__, "ShapesPipeline"     # as if top-level
    return ShapesPipeline


@dataclass
class Cond:
    """Text conditioning of a batch: keyword tensors for the denoiser (batch first), and
    the same for the empty prompt (CFG's unconditional branch)."""
    cond: dict
    uncond: dict

    def __len__(self):
        return len(next(iter(self.cond.values())))

    def index(self, idx):
        return Cond({k: v[idx] for k, v in self.cond.items()}, {k: v[idx] for k, v in self.uncond.items()})

    def to(self, device):
        return Cond({k: v.to(device) for k, v in self.cond.items()}, {k: v.to(device) for k, v in self.uncond.items()})


@dataclass
class Schedule:
    """The K-step grid. Step j = 0..K-1 (the paper's k = K - j) goes from level j to j + 1.
    timesteps (K,): what the denoiser is fed. levels (K+1,): sigma for 'flow' (1 -> 0),
    alpha-bar for 'ddim' (~0 -> ~1), i.e. the noise level at each point of the chain."""
    timesteps: torch.Tensor
    levels: torch.Tensor


class Backbone:
    def __init__(self, pipe, name, device, dtype, resolution=None):
        self.pipe, self.name, self.device, self.dtype = pipe, name, torch.device(device), dtype
        self._cache = {}                          # prompt -> its text keywords (one row each, on the CPU)
        kind = type(pipe).__name__
        self.net = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet
        self.sampler = KINDS[kind] or ("flow" if getattr(pipe, "transformer", None) is not None else "ddim")
        self.vae = getattr(pipe, "vae", None)
        self.scheduler = pipe.scheduler
        if self.sampler == "ddim":
            # the DDIM grid of the checkpoint's own noise schedule (DDPO does the same)
            from diffusers import DDIMScheduler
            self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
            if self.scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
                raise BackboneError(f"{name}: unsupported prediction_type {self.scheduler.config.prediction_type}")
        self.max_sequence_length = 256            # SD3 pipeline's default T5 length
        # the pipelines' default size: latent side = the denoiser's sample_size (x8 pixels with a VAE)
        cfg = self.net.config
        self.latent_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if resolution is not None:                # another size: latent side = pixels / the VAE's factor
            side = resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)
            self.latent_shape = (cfg.in_channels, side, side)
        for m in (self.net, self.vae, *self.text_encoders()):
            if m is not None:
                m.requires_grad_(False).eval()    # eval: no dropout, so log-probs recompute exactly

    def text_encoders(self):
        return [getattr(self.pipe, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
                if getattr(self.pipe, n, None) is not None]

    # --------------------------------------------------------------- conditioning
    @torch.no_grad()
    def _encode(self, prompts):
        """The denoiser's text keywords for prompts, batch first (no CFG branch), computed on the
        device the text encoders are on (the accelerator, or the CPU once offloaded)."""
        p = self.pipe
        device = self.text_encoders()[0].device
        if type(p).__name__ == "ShapesPipeline":
            hidden, pooled = p.encode_prompt(list(prompts), device)
            kw = {"encoder_hidden_states": hidden, "pooled_projections": pooled}
            if self.sampler == "ddim":                     # the UNet takes no pooled vector
                kw.pop("pooled_projections")
        elif self.sampler == "flow":
            e, _, pe, _ = p.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None, device=device,
                                          do_classifier_free_guidance=False,
                                          max_sequence_length=self.max_sequence_length)
            kw = {"encoder_hidden_states": e, "pooled_projections": pe}
        else:
            kw = {"encoder_hidden_states": p.encode_prompt(list(prompts), device, 1, False)[0]}
        return {k: v.to(self.device, self.dtype) for k, v in kw.items()}

    def cache_prompts(self, prompts, batch=64):
        """Encode every prompt not cached yet, batch at a time (and the empty prompt, CFG's branch)."""
        todo = list(dict.fromkeys(q for q in [""] + list(prompts) if q not in self._cache))
        for i in range(0, len(todo), batch):
            kw = self._encode(todo[i:i + batch])
            for r, q in enumerate(todo[i:i + batch]):       # on the CPU: a prompt set can outgrow the GPU
                self._cache[q] = {k: v[r].cpu() for k, v in kw.items()}

    def offload_text_encoders(self):
        """Move the text encoders to the CPU (every prompt a run uses is cached by then; one that is
        not still encodes, on the CPU). Frees the accelerator memory they held (T5-XXL: 9.5 GB in bf16)."""
        for m in self.text_encoders():
            m.to("cpu")

    def encode(self, prompts):
        """Cond for a list of prompts, from the cache (encoded once per prompt, on first use). The
        unconditional branch is the empty prompt "", as the pipelines encode it, the same row for
        every prompt (the pipelines encode it once per row)."""
        self.cache_prompts(prompts)
        stack = lambda rows: {k: torch.stack([r[k] for r in rows]).to(self.device) for k in rows[0]}
        uncond = self._cache[""]
        n = len(prompts)
        return Cond(stack([self._cache[q] for q in prompts]),
                    {k: v.to(self.device).expand(n, *v.shape) for k, v in uncond.items()})

    # --------------------------------------------------------------- the denoiser
    def _call(self, net, x_t, t, kw):
        """net on x_t and keywords kw, each fed in net's own dtype (the frozen base's under mixed
        precision; a trained full copy is fp32), the same at rollout and at recompute."""
        t = t.to(self.device).expand(x_t.shape[0]) if t.dim() == 0 else t.to(self.device)
        dtype = net.dtype
        return net(x_t.to(dtype), timestep=t, **{k: v.to(dtype) for k, v in kw.items()}, return_dict=False)[0]

    def predict(self, x_t, t, cond, cfg_scale=1.0, net=None):
        """Velocity ('flow') or epsilon ('ddim') for x_t (B, C, H, W) at timesteps t (B,) or ().
        With cfg_scale != 1 the batch is run as [uncond, cond], as diffusers' pipelines do."""
        net = net or self.net
        if cfg_scale == 1.0:
            return self._call(net, x_t, t, cond.cond).float()
        kw = {k: torch.cat([cond.uncond[k], cond.cond[k]]) for k in cond.cond}
        t2 = torch.cat([t, t]) if t.dim() else t
        pred_uncond, pred_cond = self._call(net, torch.cat([x_t, x_t]), t2, kw).float().chunk(2)
        return pred_uncond + cfg_scale * (pred_cond - pred_uncond)

    def features(self, x_t, t, cond, net=None):
        """The critic's inputs (METHOD.md section 3): the backbone's last hidden tokens
        before the output projection (B, N, D) and its timestep embedding (B, E).
        DiT: the tokens entering norm_out (and the embedding modulating it);
        UNet: the last decoder feature map, entering conv_norm_out, flattened to tokens."""
        net = net or self.net
        seen = {}
        if self.sampler == "flow":
            def grab(_, args, kwargs):
                seen["tokens"], seen["temb"] = args[0], args[1] if len(args) > 1 else kwargs["conditioning_embedding"]
            hooks = [net.norm_out.register_forward_pre_hook(grab, with_kwargs=True)]
        else:
            def grab_map(_, args):
                seen["tokens"] = args[0].flatten(2).transpose(1, 2)       # (B, H*W, C)
            def grab_temb(_, args, out):
                seen["temb"] = out
            hooks = [net.conv_norm_out.register_forward_pre_hook(grab_map),
                     net.time_embedding.register_forward_hook(grab_temb)]
        try:
            self._call(net, x_t, t, cond.cond)
        finally:
            for h in hooks:
                h.remove()
        return seen["tokens"], seen["temb"]

    # --------------------------------------------------------------- images
    DECODE_CHUNK = 8   # images per VAE call: SD3.5-M's VAE holds ~0.4 GB of activations per 512 px image

    def decode(self, x0):
        """Clean latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1], through the pipeline's
        VAE with its scaling and shift factors (the one decode path of every backbone), DECODE_CHUNK
        images at a time: an evaluation chunk of --eval-batch 64 at 512 px in one call would hold
        ~24 GB of activations (and on the CPU, smaller calls are faster per image too)."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = x0.to(self.vae.dtype) / self.vae.config.scaling_factor + shift
        images = [self.vae.decode(part, return_dict=False)[0].float() for part in z.split(self.DECODE_CHUNK)]
        return (torch.cat(images) / 2 + 0.5).clamp(0, 1)

    # --------------------------------------------------------------- the noise grid
    def schedule(self, num_steps):
        s = self.scheduler
        if self.sampler == "flow":
            kw = {}
            if s.config.get("use_dynamic_shifting", False):   # as StableDiffusion3Pipeline does
                from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
                n = (self.latent_shape[1] // self.net.config.patch_size) ** 2
                kw["mu"] = calculate_shift(n, s.config.get("base_image_seq_len", 256), s.config.get("max_image_seq_len", 4096),
                                           s.config.get("base_shift", 0.5), s.config.get("max_shift", 1.16))
            s.set_timesteps(num_steps, device="cpu", **kw)
            return Schedule(s.timesteps.clone().float(), s.sigmas.clone().float())
        s.set_timesteps(num_steps, device="cpu")
        t = s.timesteps.clone()
        prev = t - s.config.num_train_timesteps // s.num_inference_steps      # as DDIMScheduler.step
        abar = s.alphas_cumprod
        abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], s.final_alpha_cumprod)
        return Schedule(t, torch.cat([abar[t[:1]], abar_prev]).float())


def ddpm_timestep_like(alphas_cumprod, sigma):
    """The DDPM timestep whose signal-to-noise ratio abar / (1 - abar) is nearest to that of the
    flow-matching state (1 - sigma) x0 + sigma noise, ((1 - sigma) / sigma)^2. (B,) long."""
    snr_t = alphas_cumprod / (1 - alphas_cumprod)                                      # (T,)
    snr = ((1 - sigma) / sigma).pow(2)                                                 # (B,)
    return (snr_t[None] - snr[:, None]).abs().argmin(1)


def denoising_loss(sampler, scheduler, net, x0, kw, location=0.0):
    """The diffusion pretraining loss on clean latents x0 (B, C, h, w) with text keywords kw:
    what the built-in models were pretrained with (pretrain.py) and what rejection-sampling
    fine-tuning (RAFT, train.py --algo raft) trains on kept samples with.
    Noise levels: SD3's logit-normal sigma = sigmoid(N(location, 1)). 'flow': x_sigma = (1 - sigma) x0 + sigma * noise, target the
    velocity noise - x0 (rectified flow). 'ddim': the same noise levels carried to DDPM timesteps
    by signal-to-noise ratio (uniform t spends most steps at low noise), target epsilon (or v)."""
    b = lambda s: s.view(-1, 1, 1, 1)
    noise = torch.randn_like(x0)
    sigma = torch.sigmoid(torch.randn(len(x0)) + location).to(x0.device)
    if sampler == "flow":
        x_t = (1 - b(sigma)) * x0 + b(sigma) * noise
        t, target = sigma * scheduler.config.num_train_timesteps, noise - x0
    else:
        abar = scheduler.alphas_cumprod.to(x0.device)
        t = ddpm_timestep_like(abar, sigma)
        a = b(abar[t])
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = noise if scheduler.config.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    pred = net(x_t.to(net.dtype), timestep=t, **{k: v.to(net.dtype) for k, v in kw.items()}, return_dict=False)[0]
    return (pred.float() - target).pow(2).mean()


def resolve(name_or_path, flag="--model"):
    """Map a name to a hub id or directory, checked (cli.check_pipeline); a BackboneError naming the
    choices, or the flag, the directory and what is wrong with it, otherwise."""
    path = MODELS.get(name_or_path, name_or_path)
    choices = ", ".join(MODELS) + ", or a local diffusers directory"
    if os.path.isdir(path):
        try:                                      # model_index.json, configs and weights headers
            kind = check_pipeline(path)
        except InputError as e:
            raise BackboneError(f"{flag} {name_or_path}: {e}") from None
        if kind not in KINDS:
            raise BackboneError(f"{path} holds a {kind}; accepted kinds: {', '.join(KINDS)}")
        return path, kind
    if name_or_path in MODELS and name_or_path.startswith("tiny-"):
        raise BackboneError(f"the built-in checkpoint {path} is missing: run `python pretrain.py --model {name_or_path}`")
    if name_or_path in MODELS:
        return path, "StableDiffusion3Pipeline" if name_or_path == "sd3.5m" else "StableDiffusionPipeline"
    if os.sep in name_or_path or name_or_path.startswith("."):
        raise BackboneError(f"no such directory: {name_or_path}; accepted: {choices}")
    raise BackboneError(f"unknown model {name_or_path!r}; accepted: {choices}")


def load_backbone(name_or_path, device="cpu", dtype=torch.float32, no_t5=False, resolution=None):
    """A Backbone for a name (MODELS) or a diffusers directory, on `device` in `dtype`. no_t5: an SD3
    pipeline without its T5 encoder (text_encoder_3=None, as diffusers allows; its tokens are zeros).
    resolution: the pixel size to sample at (None: the model's native size); check_resolution first."""
    path, kind = resolve(name_or_path)
    import diffusers, transformers
    from diffusers import DiffusionPipeline
    ShapesPipeline = shapes_pipeline()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    cls = ShapesPipeline if kind == "ShapesPipeline" else DiffusionPipeline
    extra = {"safety_checker": None, "requires_safety_checker": False} if kind == "StableDiffusionPipeline" else {}
    if os.path.isdir(path):    # components saved as absent (e.g. SD3 without T5) load as None
        index = json.load(open(os.path.join(path, "model_index.json")))
        extra.update({k: None for k, v in index.items() if isinstance(v, list) and v[0] is None})
    if no_t5 and kind == "StableDiffusion3Pipeline":
        extra.update(text_encoder_3=None, tokenizer_3=None)
    try:
        pipe = cls.from_pretrained(path, dtype=dtype, **extra)
    except (OSError, ValueError) as e:
        hint = " (no hub access? download it elsewhere and pass its directory)" if not os.path.isdir(path) else ""
        raise BackboneError(f"cannot load {name_or_path!r}: {str(e).splitlines()[0]}{hint}") from None
    if type(pipe).__name__ != kind:
        raise BackboneError(f"{name_or_path} loaded as {type(pipe).__name__}, expected {kind}")
    pipe.set_progress_bar_config(disable=True)
    fp32_matmuls(device, dtype)
    return Backbone(pipe.to(device), name_or_path, device, dtype, resolution)


def fp32_matmuls(device, dtype):
    """How fp32 matrix products and convolutions run on a CUDA device: TF32 ("tf32") under bf16 / fp16
    weights, where the fp32 LoRA adapters (peft casts their input up to fp32) would otherwise take true
    fp32 GEMMs beside a base that is bf16 anyway; full fp32 ("ieee") when --mixed-precision no asks for
    it. Rollout and recompute run the same kernels either way. None (untouched) on other devices."""
    if torch.device(device).type != "cuda":
        return None
    mode = "ieee" if dtype == torch.float32 else "tf32"
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = mode
    return mode
