"""diffusers pipelines as benchmark models: pixel-space DDPM, latent diffusion, Stable Diffusion.

Every adapter loads with ``DiffusionPipeline.from_pretrained(source)``, where ``source`` is a hub
id (resolved through the normal Hugging Face cache) or a local directory written by
``save_pretrained``; Stable Diffusion also takes a single-file checkpoint (``.safetensors`` or
``.ckpt``, the original format) through diffusers' ``from_single_file``, with ``config``: the
folder (or hub id) of the pipeline's diffusers configs, which an offline machine must have.
Only the pipeline's components are used; sampling is the shared DDIM loop of
:class:`~bench.models.base.DiffusionAdapter`, so FP and quantized denoisers run identical
schedules. Missing weights on an offline machine make the run ``skipped``, not an error.
"""

from __future__ import annotations

import copy
import json
import shlex
import zlib
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from bench import prompts as prompt_files
from bench.cache import cached_tensors
from bench.errors import AvailabilityError
from bench.fsio import missing_path
from bench.models.base import COST_METRICS, DiffusionAdapter, Split
from bench.models.random_parts import RandomPipeline
from bench.provenance import config_hash
from bench.registry import MODELS

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def random_pipeline_config(filename: str) -> dict[str, Any]:
    """A shipped architecture config (``bench/models/configs``) for ``init: random``."""
    return json.loads(resources.files("bench.models.configs").joinpath(filename).read_text("utf-8"))


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` (non-persistent buffers too, which a state dict
    leaves out), each tied tensor once, under its first name."""
    return {name: t.detach() for name, t in (*model.named_parameters(), *model.named_buffers())}


def _assigned(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """``model`` (built on the meta device) holding ``tensors`` (from :func:`_named_tensors`)
    as its parameters and buffers, without copying them; tied tensors stay tied."""
    made: dict[int, torch.Tensor] = {}
    places = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, old in places:
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        is_param = isinstance(old, nn.Parameter)
        if id(old) not in made:
            made[id(old)] = nn.Parameter(tensors[name], requires_grad=False) if is_param else tensors[name]
        (module._parameters if is_param else module._buffers)[leaf] = made[id(old)]
    return model


def no_images(model: str) -> ValueError:
    """The error of a latent model built with random weights asked for images."""
    return ValueError(
        f"{model} with init: random has no VAE, so it makes no images; give it only metrics that need "
        "none (latency_step, weight_bytes)"
    )


class PipelineAdapter(DiffusionAdapter):
    """An unconditional diffusers pipeline with a UNet and a scheduler (DDPM/DDIM CIFAR-10 style).

    Model args: ``source`` (hub id or local directory; default ``DEFAULT_SOURCE``); ``init``:
    ``pretrained`` (default) or ``random``: the published architecture (``RANDOM_CONFIG``, shipped
    in ``bench/models/configs``) with seeded random weights, for cost runs on machines without the
    weights (latency and memory do not depend on weight values; quality metrics mean nothing).
    """

    ARGS: ClassVar[tuple[str, ...]] = ("source", "init")
    DEFAULT_SOURCE: ClassVar[str]
    # The pipeline component that is the denoiser (and its key in ``RANDOM_CONFIG``).
    COMPONENT: ClassVar[str] = "unet"
    # The diffusers pipeline class whose ``from_single_file`` reads this model's original
    # single-file checkpoints (None: only diffusers-format folders and hub ids).
    SINGLE_FILE: ClassVar[str | None] = None
    RANDOM_CONFIG: ClassVar[str | None] = None
    LOAD_KWARGS: ClassVar[dict[str, Any]] = {}
    DEFAULT_METRICS = ("fid", "kid", "fid_vs_fp", "lpips_vs_fp", "psnr_vs_fp", *COST_METRICS)

    @classmethod
    def arg_problems(cls, args: dict[str, Any]) -> list[str]:
        out = []
        if args.get("init", "pretrained") not in ("pretrained", "random"):
            out.append(f"init={args['init']!r}; choose pretrained or random")
        source = args.get("source")
        if source is not None:
            problem = missing_path(str(source), hub_ids=True)
            if problem:
                out.append(
                    f"source {problem} (a save_pretrained folder, a single-file checkpoint or a hub id)"
                )
            elif Path(str(source)).suffix in SINGLE_FILE_SUFFIXES and cls.SINGLE_FILE is None:
                out.append(
                    f"source {source} is a single-file checkpoint, which {cls.name} cannot load; give "
                    "the folder written by save_pretrained"
                )
        if args.get("config") is not None:
            problem = missing_path(str(args["config"]), hub_ids=True)
            if problem:
                out.append(f"config {problem} (the pipeline's diffusers configs: a folder or hub id)")
        return out

    @property
    def source(self) -> str:
        return str(self.args.get("source", self.DEFAULT_SOURCE))

    @cached_property
    def pipeline(self):
        from diffusers import DiffusionPipeline

        init = self.args.get("init", "pretrained")
        if init not in ("pretrained", "random"):
            raise ValueError(f"{self.name}: init={init!r}; choose pretrained or random")
        if self.random_init:
            return self._random_pipeline()
        try:
            if Path(self.source).suffix in SINGLE_FILE_SUFFIXES:
                pipe = self._single_file()
            else:
                pipe = DiffusionPipeline.from_pretrained(self.source, **self.load_kwargs())
        except (OSError, ValueError) as exc:
            if Path(self.source).exists():
                raise  # a local directory that does not load is an error, not an absence
            if missing_path(self.source, hub_ids=True):  # not a hub id's shape: a missing local path
                raise AvailabilityError(
                    f"{self.name}: source {self.source!r} is not a folder here, nor a hub id (owner/name); "
                    "give the folder written by save_pretrained, or a hub id"
                ) from None
            raise AvailabilityError(
                f"{self.name}: weights {self.source!r} are not available offline ({type(exc).__name__}); "
                f"download them (huggingface-cli download {shlex.quote(self.source)}) or set "
                "source: /local/dir"
            ) from None
        for module in pipe.components.values():
            if isinstance(module, nn.Module):
                module.to(self.device).eval().requires_grad_(False)
        return pipe

    def _single_file(self):
        """The pipeline from an original single-file checkpoint (diffusers' ``from_single_file``)."""
        import diffusers

        if self.SINGLE_FILE is None:
            raise ValueError(
                f"{self.name} cannot load a single-file checkpoint; give a save_pretrained folder"
            )
        kwargs = self.load_kwargs()
        if self.args.get("config") is not None:
            kwargs["config"] = str(self.args["config"])
        try:
            return getattr(diffusers, self.SINGLE_FILE).from_single_file(self.source, **kwargs)
        except (OSError, ValueError) as exc:
            if "config" in kwargs or not Path(self.source).is_file():
                raise
            raise AvailabilityError(
                f"{self.name}: the single-file checkpoint {self.source} needs its pipeline's configs, which "
                f"diffusers fetches from the hub ({type(exc).__name__}); offline, set config: to a folder "
                "with them (a save_pretrained folder of the same architecture, weights not needed)"
            ) from None

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``from_pretrained``/``from_single_file``: every component in
        float32, whatever the files store (a float16 folder kept float16 weights, which
        calibration, in float32, could not multiply; a run casts to its ``dtype`` itself)."""
        from diffusers.utils import deprecation_utils

        # diffusers 0.42 renamed ``torch_dtype`` to ``dtype`` (the old name warns there).
        renamed = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
        return {**self.LOAD_KWARGS, "dtype" if renamed else "torch_dtype": torch.float32}

    @property
    def random_init(self) -> bool:
        return self.args.get("init", "pretrained") == "random"

    def _random_pipeline(self):
        """The denoiser and scheduler built from the shipped published config, seeded.

        ``RANDOM_CONFIG`` holds the denoiser's config under :attr:`COMPONENT` and the
        scheduler's under ``scheduler``; optionally ``vae`` (the fields the latent shape needs:
        ``latent_channels``, ``block_out_channels``; or the whole published config, which makes
        images), ``text_encoder`` and ``tokenizer`` (see :class:`RandomPipeline`) and
        ``conditions`` (each conditioning input's per-sample shape, for
        :meth:`TextToImageAdapter.random_conditions`).
        """
        import diffusers

        if self.RANDOM_CONFIG is None:
            raise ValueError(f"{self.name} ships no architecture config; init: random is not available")
        config = random_pipeline_config(self.RANDOM_CONFIG)
        scheduler_cls = getattr(diffusers, config["scheduler"]["_class_name"])
        # The pipeline holds a weightless twin on the meta device, for its config: the weights
        # are built when the denoiser is asked for (:meth:`fp_component`), so a 9.6 GiB SDXL
        # UNet is not resident twice (the pipeline's and the run's).
        with torch.device("meta"):
            model = self._random_component(config)
        parts = {self.COMPONENT: model, "scheduler": scheduler_cls.from_config(config["scheduler"])}
        return RandomPipeline(config, self.device, **parts)

    def _random_component(self, config: dict[str, Any]) -> nn.Module:
        import diffusers

        model_cls = getattr(diffusers, config[self.COMPONENT]["_class_name"])
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same random weights in every process and every build
            return model_cls.from_config(config[self.COMPONENT]).eval().requires_grad_(False)

    def fp_component(self) -> nn.Module:
        """The denoiser's FP module, the caller's own: for random init built from its seed (the
        same weights every time), else a copy of the pipeline's."""
        if self.random_init:
            return self._mapped_random_component().to(self.device)
        return copy.deepcopy(getattr(self.pipeline, self.COMPONENT))

    def _mapped_random_component(self) -> nn.Module:
        """The random-init denoiser with its tensors memory-mapped from the cache (built and
        stored there the first time).

        Mapped, its weights are file pages the kernel can drop under memory pressure and read
        back, not memory only the process can free: a runtime that copies the weights
        (OpenVINO compiling SDXL's 9.6 GiB UNet, NNCF's statistics model) then has the room the
        FP model, which the runner keeps for the next run, would otherwise hold. Writes go to
        private copies of the pages, never to the file. A cache that cannot be written keeps
        the built model in memory.
        """
        import diffusers

        config = self.pipeline.config
        with torch.device("meta"):
            model = self._random_component(config)
        named = _named_tensors(model)
        expected = {name: (tuple(t.shape), t.dtype) for name, t in named.items()}

        def problem(tensors: dict[str, torch.Tensor]) -> str | None:
            if {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()} != expected:
                return f"its tensors are not those of {self.name}'s {self.COMPONENT}"
            return None

        def build() -> dict[str, torch.Tensor]:
            return _named_tensors(self._random_component(config))

        # The weights follow from the config, the seed, and the library versions whose
        # initialisers and generator drew them.
        key = config_hash("random-weights", config[self.COMPONENT], torch.__version__, diffusers.__version__)
        tensors, cached = cached_tensors("random-weights", key, build, check=problem)
        if cached:
            return _assigned(model, tensors)
        # Built here, so held in memory: map the entry just written instead (where the cache
        # could not write it, the built tensors come back and stay in memory).
        mapped, _ = cached_tensors("random-weights", key, lambda: tensors, check=problem)
        return _assigned(model, mapped)

    def denoiser(self) -> nn.Module:
        return self.fp_component()

    def scheduler(self):
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.pipeline.scheduler.config)

    def latent_shape(self) -> tuple[int, ...]:
        config = self.pipeline.unet.config
        size = config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (config.in_channels, *size)


class LatentPipelineAdapter(PipelineAdapter):
    """Unconditional latent diffusion (``LDMPipeline``: UNet in a VQ-VAE's latent space)."""

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pipeline.vqvae.decode(x).sample


class TextToImageAdapter(PipelineAdapter):
    """Stable Diffusion text-to-image with classifier-free guidance.

    Model args: ``source`` (also a single-file ``.safetensors``/``.ckpt``, with ``config``: the
    folder or hub id of its diffusers configs, needed offline); ``prompts``: the evaluation
    prompts (a UTF-8 text file, one prompt per line, or a shipped set; default
    ``parti-evaluation``); ``calib_prompts``: the calibration prompts, disjoint from them
    (default ``parti-calibration``); ``guidance_scale`` (default 7.5). Sample ``i`` uses prompt
    ``i mod len(prompts)`` of its set (:mod:`bench.prompts`).
    """

    ARGS = ("source", "init", "config", "prompts", "calib_prompts", "guidance_scale")
    # Which model argument names each split's prompt set.
    PROMPT_ARGS: ClassVar[tuple[tuple[Split, str], ...]] = (
        ("evaluation", "prompts"),
        ("calibration", "calib_prompts"),
    )
    SINGLE_FILE = "StableDiffusionPipeline"
    LOAD_KWARGS: ClassVar[dict[str, Any]] = {"safety_checker": None, "requires_safety_checker": False}
    CAPABILITIES = frozenset({"text-to-image"})
    DEFAULT_METRICS = ("clip_score", "fid", "fid_vs_fp", "lpips_vs_fp", "psnr_vs_fp", *COST_METRICS)
    DEFAULT_GUIDANCE = 7.5

    @classmethod
    def arg_problems(cls, args: dict[str, Any]) -> list[str]:
        out = super().arg_problems(args)
        problems = {
            arg: prompt_files.source_problem(str(args[arg]))
            for arg in ("prompts", "calib_prompts")
            if arg in args
        }
        out.extend(f"{arg} {p} (a UTF-8 text file, one prompt per line)" for arg, p in problems.items() if p)
        if not any(problems.values()):
            try:
                cls.load_prompt_sets(args)
            except ValueError as exc:
                out.append(str(exc))
        return out

    @classmethod
    def load_prompt_sets(cls, args: dict[str, Any]) -> dict[Split, prompt_files.PromptSet]:
        """The evaluation and calibration prompt sets ``args`` name (or the shipped ones); a
        ValueError if they share a prompt."""
        sets = {
            split: prompt_files.load(str(args.get(arg, prompt_files.DEFAULT[split])))
            for split, arg in cls.PROMPT_ARGS
        }
        shared = prompt_files.overlap(sets["calibration"], sets["evaluation"])
        if shared:
            raise ValueError(
                f"{len(shared)} calibration prompt(s) of {sets['calibration'].name} are also evaluation "
                f"prompts of {sets['evaluation'].name} (e.g. {shared[0]!r}); calibration must not see "
                "what is scored: give calib_prompts a disjoint set"
            )
        return sets

    @cached_property
    def prompt_sets(self) -> dict[Split, prompt_files.PromptSet]:
        try:
            return self.load_prompt_sets(self.args)
        except ValueError as exc:
            raise ValueError(f"{self.name}: {exc}") from None

    def prompts(self, n: int, split: Split = "evaluation") -> list[str]:
        return self.prompt_sets[split].take(0, n)

    def row_fields(self) -> dict[str, Any]:
        return {"prompt_sets": {split: s.record() for split, s in self.prompt_sets.items()}}

    def identity(self) -> dict[str, Any]:
        # Both sets: FP samples depend on the first, calibration data (keyed on this too) on the second.
        return {**super().identity(), "prompts": {k: s.sha256 for k, s in self.prompt_sets.items()}}

    @torch.no_grad()
    def random_conditions(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """What the text encoders of a random-init pipeline would hand the denoiser: for each
        input in its config's ``conditions``, a tensor of that per-sample shape, seeded by the
        prompt's text (a list: standard normal) or filled with a constant (``{"shape": [...],
        "fill": v}``: an attention mask of ones). Cost does not depend on these values."""
        out = {}
        for name, spec in self.pipeline.config["conditions"].items():
            if isinstance(spec, dict):
                out[name] = torch.full((len(prompts), *spec["shape"]), float(spec["fill"]))
                continue
            seeded = [torch.Generator().manual_seed(zlib.crc32(f"{name}:{p}".encode())) for p in prompts]
            out[name] = torch.stack([torch.randn(*spec, generator=g) for g in seeded])
        return {k: v.to(self.device) for k, v in out.items()}

    def text_conditions(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The denoiser's conditioning for ``prompts``: the pipeline's encoders
        (:meth:`encode`), or seeded tensors of their shapes for a random-init model."""
        weightless = self.random_init and not self.needs_text_encoder
        return self.random_conditions(prompts) if weightless else self.encode(prompts)

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> torch.Tensor:
        tokenizer, encoder = self.pipeline.tokenizer, self.pipeline.text_encoder
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return encoder(ids.to(self.device))[0]

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The denoiser's conditioning for ``prompts``, each tensor with a leading batch dim."""
        return {"encoder_hidden_states": self._embed(prompts)}

    def negative(self, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unconditional half of a guided batch: the empty prompt's conditioning."""
        return self.text_conditions([""])

    def conditions(self, start: int, n: int, split: Split = "evaluation") -> dict[str, torch.Tensor]:
        with torch.no_grad():
            text = self.text_conditions(self.prompt_sets[split].take(start, n))
            if not self.guided():
                return text
            empty = self.negative(text)
        return {k: torch.cat([empty[k].expand_as(v), v]) for k, v in text.items()}

    def guided(self) -> bool:
        return True

    @property
    def needs_text_encoder(self) -> bool:
        """A random-init model whose config ships its VAE makes images, so it encodes prompts
        with its (random) text encoder too, as a real pipeline would; otherwise it hands the
        denoiser seeded tensors of the encoder's output shape."""
        return not self.random_init or self.pipeline.has("vae")

    def denoiser(self) -> nn.Module:
        model = super().denoiser()
        if self.random_init and self.needs_text_encoder:
            # Built with the denoiser, as a loaded pipeline's are: never first inside a metric's
            # memory window (a sampling run's peak would count their weights as working memory).
            _ = self.pipeline.text_encoder, self.pipeline.tokenizer, self.pipeline.vae
        return model

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.random_init and not self.pipeline.has("vae"):
            raise no_images(self.name)
        vae = self.pipeline.vae
        return vae.decode(x / vae.config.scaling_factor).sample


@MODELS.add
class DDIMCifar10(PipelineAdapter):
    """DDPM CIFAR-10 32×32 (Ho et al.) sampled with DDIM, Q-Diffusion's CIFAR-10 setting."""

    IMAGE_SHAPE = (3, 32, 32)

    name = "ddim-cifar10"
    DEFAULT_SOURCE = "google/ddpm-cifar10-32"
    RANDOM_CONFIG = "ddpm-cifar10-32.json"
    DEFAULT_METRICS = (
        "fid", "kid", "inception_score", "fid_vs_fp", "lpips_vs_fp", "psnr_vs_fp", *COST_METRICS
    )  # fmt: skip
    FID_REFERENCE = "cifar10-train"  # the paper's: 50k CIFAR-10 training images


@MODELS.add
class LDMCelebAHQ(LatentPipelineAdapter):
    """LDM CelebA-HQ 256×256 (latent diffusion, VQ-VAE), DDIM.

    The latent-diffusion model published in diffusers format; the paper's LSUN LDMs load the
    same way from a converted local directory via ``source``.
    """

    IMAGE_SHAPE = (3, 256, 256)

    name = "ldm-celebahq"
    DEFAULT_SOURCE = "CompVis/ldm-celebahq-256"


@MODELS.add
class StableDiffusion15(TextToImageAdapter):
    """Stable Diffusion v1.5 text-to-image, DDIM with classifier-free guidance.

    The paper used v1.4 with PLMS; both v1 checkpoints share the architecture.
    """

    name = "sd-1.5"
    DEFAULT_SOURCE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    RANDOM_CONFIG = "sd-1.5.json"
