"""Tiny random-weight pipelines of the real architectures (SD3.5-M, SD1.5), built offline
from configs and saved with save_pretrained, so tests and benchmarks run the real loaders
and code paths without a download. Tokenizers are written here: a character-level CLIP BPE
vocabulary (no merges), enough for CLIPTokenizer to work on any lower-case prompt."""
import json
import os
import string

import torch

MAX_TOKENS = 32               # characters are tokens here: room for the shapes world's prompts


def write_clip_tokenizer(path):
    from transformers import CLIPTokenizer
    os.makedirs(path, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tok = CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"),
                        model_max_length=MAX_TOKENS)
    return tok


def _clip_text(cls, vocab_size, hidden, proj, seed):
    from transformers import CLIPTextConfig
    torch.manual_seed(seed)
    # eos_token_id set before construction: the pooled output is read at the first EOS
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                            projection_dim=proj, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return cls(config).eval()


def t5_parts(seed, width=32):
    """A tiny T5 encoder (d_model = the transformer's joint_attention_dim) and a word-level tokenizer
    (tokenizers' WordLevel; words it does not know are <unk>): SD3's third text encoder in miniature."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel
    words = "a an the one two three four red green blue yellow circle circles square squares triangle cat dog of left right".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                  model_max_length=512)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(vocab), d_model=width, d_kv=8, d_ff=2 * width, num_layers=1, num_heads=2)
    return T5EncoderModel(config).eval(), tok


def make_tiny_sd3(path, seed=0, sample_size=8, t5=False):
    """A StableDiffusion3Pipeline with random weights (with a tiny T5 encoder if t5, else none), saved to `path`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection
    tok = write_clip_tokenizer(os.path.join(path, "_tok"))
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4,
                                        num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                        joint_attention_dim=32, caption_projection_dim=16,
                                        pooled_projection_dim=32, pos_embed_max_size=sample_size // 2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=2, sample_size=sample_size * 2,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    te1 = _clip_text(CLIPTextModelWithProjection, len(tok), 16, 16, seed + 1)
    te2 = _clip_text(CLIPTextModelWithProjection, len(tok), 16, 16, seed + 2)
    te3, tok3 = t5_parts(seed + 3) if t5 else (None, None)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae.eval(), text_encoder=te1, tokenizer=tok, text_encoder_2=te2,
                                    tokenizer_2=tok, text_encoder_3=te3, tokenizer_3=tok3)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def make_tiny_sd15(path, seed=0, sample_size=8):
    """A StableDiffusionPipeline with random weights and SD1.5's DDIM schedule, saved to `path`."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel
    tok = write_clip_tokenizer(os.path.join(path, "_tok"))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
                                attention_head_dim=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=2, sample_size=sample_size * 2,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=_clip_text(CLIPTextModel, len(tok), 16, 16, seed + 1),
                                   tokenizer=tok, unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
