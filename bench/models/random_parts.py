"""The parts of a random-init pipeline beyond its denoiser (:meth:`PipelineAdapter._random_pipeline`):
a VAE, text encoder and CLIP tokenizer built, seeded, from the shipped published configs, so that
a random-weight model makes images at its real shapes with nothing downloaded."""

from __future__ import annotations

import json
from functools import cache, cached_property
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn


class RandomPipeline(SimpleNamespace):
    """What a random-init adapter reads of a pipeline: the denoiser's weightless twin, the
    scheduler and the shipped ``config``; and the parts its config describes whole, each built
    seeded on first use, so that cost runs, which need none of them, build none:

    - ``vae``: the published config (with ``_class_name``) builds the decoder; only the fields
      the latent shape needs give an object with just that ``config``;
    - ``text_encoder``: a transformers model's published config (with ``_class_name``);
    - ``tokenizer``: ``{"_class_name": "CLIPTokenizer", "vocabulary": "open_clip"}``, CLIP's BPE
      vocabulary as open_clip ships it (no download).
    """

    def __init__(self, config: dict[str, Any], device: torch.device, **parts: Any) -> None:
        super().__init__(config=config, device=device, **parts)

    def has(self, part: str) -> bool:
        """Whether the config describes ``part`` whole (it can be built)."""
        return "_class_name" in self.config.get(part, {})

    @cached_property
    def vae(self):
        spec = self.config.get("vae")
        if spec is None or not self.has("vae"):
            return None if spec is None else SimpleNamespace(config=SimpleNamespace(**spec))
        import diffusers

        return self._seeded(lambda: getattr(diffusers, spec["_class_name"]).from_config(spec))

    @cached_property
    def text_encoder(self):
        import transformers

        spec = dict(self.config["text_encoder"])
        model_cls = getattr(transformers, spec.pop("_class_name"))
        return self._seeded(lambda: model_cls(model_cls.config_class(**spec)))

    @cached_property
    def tokenizer(self):
        spec = self.config["tokenizer"]
        if (spec.get("_class_name"), spec.get("vocabulary")) != ("CLIPTokenizer", "open_clip"):
            raise ValueError(f"random-init tokenizer {spec}: only CLIPTokenizer over open_clip's vocabulary")
        return clip_tokenizer(int(spec["model_max_length"]))

    def _seeded(self, build) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same weights in every process
            return build().to(self.device).eval().requires_grad_(False)


@cache
def clip_tokenizer(max_length: int):
    """transformers' ``CLIPTokenizer`` over CLIP's BPE merges as open_clip ships them: the
    vocabulary SD-1.x's tokenizer files hold (byte symbols, their word-final forms, 48,894
    merges, start and end of text: 49,408 tokens), written where the tokenizer can read it."""
    import gzip
    import tempfile

    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.decompress(Path(default_bpe()).read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = [*symbols, *(s + "</w>" for s in symbols), *(m.replace(" ", "") for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), "utf-8")
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
        # File names as text: transformers 4 reads them; 5 also takes them (as a str only).
        return CLIPTokenizer(
            str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"), model_max_length=max_length
        )
