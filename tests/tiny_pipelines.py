"""Tiny random diffusers pipelines saved with ``save_pretrained``: the real loading code runs on
them offline. Seeded; each builds in well under a second."""

from __future__ import annotations

from pathlib import Path

import torch

# Image autoencoders (VQ for LDM, KL for Stable Diffusion): 16×16×3 images, 2× down to 8×8 latents.
VAE_LAYOUT = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (8, 8),
    "norm_num_groups": 4,
    "sample_size": 16,
}


def unet2d(in_channels: int, sample_size: int):
    """A small random UNet2DModel with skip concatenations and attention at the lowest level."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    )


def cond_unet(**changes):
    """A small random UNet2DConditionModel with cross-attention (Stable Diffusion's layout;
    ``changes`` override its config, e.g. SDXL's added conditions)."""
    from diffusers import UNet2DConditionModel

    config = dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    return UNet2DConditionModel(**{**config, **changes})


def save_ddpm(path: Path) -> Path:
    """Pixel-space unconditional pipeline (``google/ddpm-cifar10-32`` layout), 3×8×8."""
    from diffusers import DDPMPipeline, DDPMScheduler

    torch.manual_seed(0)
    DDPMPipeline(
        unet=unet2d(3, 8), scheduler=DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    ).save_pretrained(path)
    return path


def save_ldm(path: Path) -> Path:
    """Latent unconditional pipeline (``CompVis/ldm-celebahq-256`` layout): VQ-VAE + UNet."""
    from diffusers import DDIMScheduler, LDMPipeline, VQModel

    torch.manual_seed(0)
    vqvae = VQModel(**VAE_LAYOUT, layers_per_block=1, latent_channels=3, num_vq_embeddings=16)
    LDMPipeline(
        vqvae=vqvae,
        unet=unet2d(3, 8),
        scheduler=DDIMScheduler(num_train_timesteps=100, clip_sample=False, steps_offset=1),
    ).save_pretrained(path)
    return path


def _tokenizer(folder: Path, max_length: int = 16):
    """A byte-level CLIP tokenizer with no merges: every character is a token."""
    import json

    import transformers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    if int(transformers.__version__.split(".")[0]) >= 5:
        return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length), len(vocab)
    folder.mkdir(parents=True, exist_ok=True)  # transformers 4 reads its vocabulary from files
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length
    )
    return tokenizer, len(vocab)


def save_sd(path: Path) -> Path:
    """Stable Diffusion layout: CLIP text encoder + tokenizer, KL VAE, conditional UNet."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    tokenizer, vocab_size = _tokenizer(path.parent / f"{path.name}-vocab")
    text = _clip_text(vocab_size)
    unet = cond_unet()
    vae = AutoencoderKL(**VAE_LAYOUT, latent_channels=4)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(num_train_timesteps=100, clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def save_sd_real_size(path: Path) -> Path:
    """Stable Diffusion 1.5 at its published shapes with seeded random weights, saved in float16
    (2 GB): the parts of the suite's own ``init: random`` model (UNet, scheduler, KL VAE, CLIP
    ViT-L/14 text encoder and CLIP's tokenizer, from the shipped config), as a save_pretrained
    folder, so that loading one runs too. Numbers from it mean nothing."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from bench.registry import MODELS
    from bench.spec import Sampling

    adapter = MODELS.get("sd-1.5")(Sampling(device="cpu"), init="random")
    parts = adapter.pipeline
    pipe = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=adapter.denoiser(),
        scheduler=PNDMScheduler.from_config(parts.config["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(path)
    return path


def _clip_text(vocab_size: int, with_projection: bool = False):
    """A one-layer CLIP text encoder, 16 wide, over 16 tokens."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        projection_dim=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _t5(width: int = 16):
    """A tiny T5 encoder and a character-level sentencepiece-style tokenizer (built in memory)."""
    import string

    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(c, -1.0) for c in string.ascii_letters + string.digits + " ▁,.'-"]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=32)
    encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=width,
            d_ff=2 * width,
            d_kv=8,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
        )
    )
    return tokenizer, encoder


def _kl_vae(latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_LAYOUT, latent_channels=latent_channels, **extra)


def save_pixart(path: Path) -> Path:
    """PixArt-α layout: T5 text encoder, KL VAE, PixArtTransformer2DModel with learned sigma."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    tokenizer, encoder = _t5()
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=16,
        norm_num_groups=4,
    )
    PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=encoder, vae=_kl_vae(4), transformer=transformer,
        scheduler=DDIMScheduler(num_train_timesteps=100, clip_sample=False, steps_offset=1),
    ).save_pretrained(path)  # fmt: skip
    return path


def save_sd3(path: Path) -> Path:
    """SD3 layout: two CLIP text encoders with projection, no T5 (zeros), MM-DiT, flow matching."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tokenizer, vocab = _tokenizer(path.parent / f"{path.name}-vocab")
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        pos_embed_max_size=16,
    )
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_kl_vae(4, shift_factor=0.06, scaling_factor=1.5),
        text_encoder=_clip_text(vocab, True), tokenizer=tokenizer,
        text_encoder_2=_clip_text(vocab, True), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    ).save_pretrained(path)  # fmt: skip
    return path


def save_flux(path: Path) -> Path:
    """FLUX.1-dev layout: CLIP + T5 text encoders, guidance-distilled MM-DiT with single blocks."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    tokenizer, vocab = _tokenizer(path.parent / f"{path.name}-vocab")
    t5_tokenizer, t5 = _t5()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )
    FluxPipeline(
        transformer=transformer, vae=_kl_vae(4, shift_factor=0.1, scaling_factor=0.5),
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4,
                                                  max_image_seq_len=64, base_shift=0.5, max_shift=1.15),
        text_encoder=_clip_text(vocab), tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer,
    ).save_pretrained(path)  # fmt: skip
    return path


def save_sdxl(path: Path) -> Path:
    """SDXL layout: two CLIP text encoders (the second with projection), a UNet with text-time
    added conditions."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    torch.manual_seed(0)
    tokenizer, vocab = _tokenizer(path.parent / f"{path.name}-vocab")
    unet = cond_unet(
        cross_attention_dim=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=16 + 6 * 4,  # pooled text + 6 size ids × 4
    )
    StableDiffusionXLPipeline(
        vae=_kl_vae(4), unet=unet,
        scheduler=DDIMScheduler(num_train_timesteps=100, clip_sample=False, steps_offset=1),
        text_encoder=_clip_text(vocab), tokenizer=tokenizer,
        text_encoder_2=_clip_text(vocab, True), tokenizer_2=tokenizer,
    ).save_pretrained(path)  # fmt: skip
    return path
