"""diffusers adapters on tiny random pipelines loaded from local directories (no downloads)."""

import pytest
import torch
from helpers import TINY_SETTINGS

import qdiff
from bench.cache import cache_dir
from bench.errors import AvailabilityError
from bench.matrix import load_matrix
from bench.registry import MODELS
from bench.runner import run_matrix
from bench.spec import Sampling

SAMPLING = Sampling(samples=4, steps=3, batch_size=4, device="cpu")
SHAPES = {"ddim-cifar10": (3, 8, 8), "ldm-celebahq": (3, 16, 16), "sd-1.5": (3, 16, 16)}
# The transformer and SDXL adapters (bench.models.transformers): what each denoiser is given
# besides (x, t), and whether guidance doubles the batch (FLUX-dev's guidance is an input).
CONDITIONING = {
    "sd-1.5": ({"encoder_hidden_states"}, 2),
    "pixart-alpha": ({"encoder_hidden_states", "encoder_attention_mask"}, 2),
    "sd3": ({"encoder_hidden_states", "pooled_projections"}, 2),
    "flux": ({"encoder_hidden_states", "pooled_projections", "guidance"}, 1),
    "sdxl": ({"encoder_hidden_states", "text_embeds", "time_ids"}, 2),
}
TEXT_TO_IMAGE = ["sd-1.5", "pixart-alpha", "sd3", "flux", "sdxl"]
SHAPES.update({name: (3, 16, 16) for name in TEXT_TO_IMAGE})


def _args(name: str, tiny_pipelines) -> dict:
    # The tiny transformers are trained for no size; 16² images (8² latents) keep them tiny.
    return {"source": str(tiny_pipelines[name]), **({"resolution": 16} if name in TEXT_TO_IMAGE[1:] else {})}


@pytest.mark.parametrize("name", ["ddim-cifar10", "ldm-celebahq", *TEXT_TO_IMAGE])
def test_adapter_samples_paired_images_and_records_calibration_inputs(name, tiny_pipelines):
    adapter = MODELS.get(name)(SAMPLING, **_args(name, tiny_pipelines))
    fp = adapter.denoiser()
    images = adapter.sample(fp, 4, seed=1)
    assert images.shape == (4, *SHAPES[name]) and images.dtype == torch.uint8
    assert torch.equal(images, adapter.sample(fp, 4, seed=1))  # a seed fixes the samples
    assert not torch.equal(images, adapter.sample(fp, 4, seed=2))
    # Same seed, other batch size: the same images (up to one grey level of round-off).
    halves = MODELS.get(name)(
        Sampling(samples=4, steps=3, batch_size=2, device="cpu"), **_args(name, tiny_pipelines)
    )
    assert (halves.sample(fp, 4, seed=1).int() - images.int()).abs().max() <= 1

    data = adapter.calibration_data(fp, qdiff.CalibConfig("uniform", num_timesteps=2, samples_per_timestep=2))
    keys, doubled = CONDITIONING.get(name, (set(), 1))  # classifier-free guidance runs both halves
    assert len(data) == 2 * 2 * doubled and data.t.unique().numel() == 2
    assert set(data.cond) == keys
    if keys:
        n = len(adapter.prompt_sets["evaluation"].prompts)
        assert adapter.prompts(n + 1)[n] == adapter.prompts(1)[0]  # prompts cycle
    # the recorded inputs are exactly what the denoiser takes
    out = fp(data.x[:2], data.t[:2], **{k: v[:2] for k, v in data.cond.items()}).sample
    assert out.shape == data.x[:2].shape


def test_a_float16_folder_loads_in_float32(tiny_pipelines, tmp_path):
    """Checkpoints are often stored in float16; calibration runs in float32 (a run casts to its
    own dtype), so every component loads as float32. Found by the GPU quality smoke, whose
    float16 folder made quantization fail ("Half != float")."""
    from diffusers import StableDiffusionPipeline

    half = tmp_path / "sd-fp16"
    StableDiffusionPipeline.from_pretrained(tiny_pipelines["sd-1.5"]).to(torch.float16).save_pretrained(half)
    adapter = MODELS.get("sd-1.5")(SAMPLING, source=str(half))
    fp = adapter.denoiser()
    assert fp.dtype == adapter.pipeline.vae.dtype == adapter.pipeline.text_encoder.dtype == torch.float32
    x, t, kwargs = adapter.step_inputs(2, 0)
    with torch.no_grad():
        assert fp(x, t, **kwargs).sample.dtype == torch.float32  # what calibration runs


def test_prompts_file_and_guidance(tiny_pipelines, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    adapter = MODELS.get("sd-1.5")(SAMPLING, source=str(tiny_pipelines["sd-1.5"]), prompts=str(prompts))
    assert adapter.prompts(3) == ["a cat", "a dog", "a cat"]
    fp = adapter.denoiser()
    weak = MODELS.get("sd-1.5")(
        SAMPLING, source=str(tiny_pipelines["sd-1.5"]), prompts=str(prompts), guidance_scale=1.0
    )
    assert not torch.equal(adapter.sample(fp, 2, 0), weak.sample(fp, 2, 0))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="has no prompts"):
        MODELS.get("sd-1.5")(
            SAMPLING, source=str(tiny_pipelines["sd-1.5"]), prompts=str(tmp_path / "empty.txt")
        ).prompts(1)


def test_calibration_never_sees_an_evaluation_prompt(tiny_pipelines, tmp_path):
    """Calibration trajectories are conditioned on the calibration prompts only; samples, and the
    held-out error metric's trajectories, on the evaluation prompts only; sets that share a
    prompt are refused."""
    (tmp_path / "eval.txt").write_text("# a header line\na cat\na dog\n")
    (tmp_path / "calib.txt").write_text("a boat\na tree\na house\n")
    source = str(tiny_pipelines["sd-1.5"])
    adapter = MODELS.get("sd-1.5")(
        SAMPLING, source=source, prompts=str(tmp_path / "eval.txt"), calib_prompts=str(tmp_path / "calib.txt")
    )
    seen = []
    encode = adapter.text_conditions
    adapter.text_conditions = lambda prompts: seen.extend(prompts) or encode(prompts)
    fp = adapter.denoiser()
    config = qdiff.CalibConfig("uniform", num_timesteps=2, samples_per_timestep=4)
    adapter.calibration_data(fp, config)
    assert set(seen) - {""} == {"a boat", "a tree", "a house"}  # "": guidance's unconditional half
    seen.clear()
    adapter.sample(fp, 4, seed=0)
    adapter.calibration_data(fp, config, split="evaluation")  # eps_mse's held-out trajectories
    assert set(seen) - {""} == {"a cat", "a dog"}
    fields = adapter.row_fields()["prompt_sets"]
    assert fields["evaluation"]["prompts"] == 2 and fields["calibration"]["name"] == str(
        tmp_path / "calib.txt"
    )

    (tmp_path / "leaky.txt").write_text("a boat\nA  Cat\n")
    leaks = {"prompts": str(tmp_path / "eval.txt"), "calib_prompts": str(tmp_path / "leaky.txt")}
    assert any("also evaluation prompts" in p for p in MODELS.get("sd-1.5").arg_problems(leaks))  # validate
    leaky = MODELS.get("sd-1.5")(
        SAMPLING, source=source, prompts=str(tmp_path / "eval.txt"), calib_prompts=str(tmp_path / "leaky.txt")
    )
    with pytest.raises(
        ValueError, match=r"1 calibration prompt\(s\) .* are also evaluation prompts .*'A  Cat'"
    ):
        leaky.calibration_data(fp, config)


def test_shipped_prompt_sets_are_disjoint_and_match_their_headers():
    from importlib import resources

    from bench import prompts

    sets = {name: prompts.load(name) for name in prompts.BUILTIN}
    for name, s in sets.items():
        header = resources.files("bench.prompts").joinpath(prompts.BUILTIN[name]).read_text("utf-8")
        assert f"# sha256: {s.sha256}\n" in header and "licence: Apache-2.0" in header
    evaluation, calibration = sets["parti-evaluation"], sets["parti-calibration"]
    assert len(evaluation.prompts) + len(calibration.prompts) == 1632  # all of PartiPrompts, once
    assert not prompts.overlap(calibration, evaluation)


def test_absent_weights_are_unavailable_not_an_error(tmp_path):
    adapter = MODELS.get("sd-1.5")(SAMPLING, source="no-org/not-cached")
    with pytest.raises(AvailabilityError, match=r"not available offline .* set source: /local/dir"):
        adapter.denoiser()
    if not torch.cuda.is_available():
        with pytest.raises(AvailabilityError, match="no CUDA device"):
            MODELS.get("sd-1.5")(Sampling(device="cuda"))


@pytest.mark.parametrize("name", TEXT_TO_IMAGE)
def test_quantized_text_to_image_end_to_end(
    name, tiny_pipelines, tiny_clip, reference_images, alexnet_features, tmp_path
):
    """Every default metric of a text-to-image model, with tiny CLIP and FID extractors."""
    clip_model, clip_weights = tiny_clip
    settings = (
        f"{TINY_SETTINGS[:-1]}, fid_extractor: 'fid_extractors:TinyTorchFidelity', "
        f"fid_reference: {reference_images}, clip_model: {clip_model}, clip_pretrained: {clip_weights}, "
        f"lpips_weights: {alexnet_features}, latency_warmup: 0, latency_repeats: 2}}"
    )
    path = tmp_path / "sd.yaml"
    args = _args(name, tiny_pipelines)
    path.write_text(
        f"name: sd\nmodels: [{{name: {name}, {', '.join(f'{k}: {v}' for k, v in args.items())}}}]\n"
        f"methods: [linear, qdiff]\nbits: [W8A8]\nsettings: {settings}\n"
    )
    rows = run_matrix(load_matrix(path), tmp_path / "results", progress=False, log=lambda _: None)
    defaults = MODELS.get(name).DEFAULT_METRICS
    fp_metrics = {"clip_score", "fid", "latency_step", "latency_e2e", "peak_memory", "weight_bytes"}
    assert {(r["method"], r["metric"], r["status"]) for r in rows} == {
        *((m, metric, "ok") for m in ("linear", "qdiff") for metric in defaults),
        *(("fp", metric, "ok") for metric in fp_metrics),
    }
    by = {(r["method"], r["metric"]): r for r in rows}
    assert all(10 < by[m, "psnr_vs_fp"]["value"] < 100 for m in ("linear", "qdiff"))  # close, not equal
    clip = by["fp", "clip_score"]
    assert (
        0 <= clip["value"] <= 100
        and clip["clip_pretrained"] == clip_weights
        and "torchmetrics" in clip["scale"]
    )
    # Every row names both prompt sets: the shipped, disjoint PartiPrompts splits.
    sets = {(r["prompt_sets"]["evaluation"]["name"], r["prompt_sets"]["calibration"]["name"]) for r in rows}
    assert sets == {("parti-evaluation", "parti-calibration")}
    fid = by["qdiff", "fid"]
    assert fid["fid_backend"] == "torch-fidelity" and fid["n_gen"] == 24 and fid["n_ref"] == 32
    assert fid["evaluation"]["fid_reference"] == str(reference_images) and fid["metric_s"] >= 0
    assert (
        by["qdiff", "fid_vs_fp"]["value"] > 0
        and 0 < by["qdiff", "lpips_vs_fp"]["value"] < 1
        and by["fp", "weight_bytes"]["value"] > by["qdiff", "weight_bytes"]["value"]
    )


def test_random_init_builds_the_published_architecture_with_seeded_weights():
    from bench.models.pipelines import DDIMCifar10
    from bench.spec import Sampling

    sampling = Sampling(device="cpu", steps=2, batch_size=2, samples=2)
    adapter = DDIMCifar10(sampling, init="random")
    a, b, c = adapter.denoiser(), adapter.denoiser(), DDIMCifar10(sampling, init="random").denoiser()
    assert sum(p.numel() for p in a.parameters()) == 35_746_307  # google/ddpm-cifar10-32's UNet
    params = zip(a.parameters(), b.parameters(), c.parameters(), strict=True)
    assert all(torch.equal(p, q) and torch.equal(p, r) for p, q, r in params)
    assert a.conv_in.weight.data_ptr() != b.conv_in.weight.data_ptr()  # each caller's own
    # Built once, then mapped from the cache; a caller's writes stay its own, never the file's.
    assert len(list((cache_dir() / "random-weights").glob("*.safetensors"))) == 1
    a.conv_in.weight.add_(1.0)
    assert torch.equal(adapter.denoiser().conv_in.weight, b.conv_in.weight)
    # The pipeline keeps no weights of its own (a real-size model is not resident twice).
    assert all(p.is_meta for p in adapter.pipeline.unet.parameters())
    x, _, kwargs = DDIMCifar10(sampling, init="random").step_inputs(2, 0)
    assert x.shape == (2, 3, 32, 32) and kwargs == {}


def test_a_mapped_model_keeps_its_ties_and_non_persistent_buffers():
    from bench.models.pipelines import _assigned, _named_tensors

    def build():
        model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
        model[1].weight = model[0].weight
        model.register_buffer("table", torch.arange(3.0), persistent=False)
        return model

    torch.manual_seed(0)
    real = build()
    with torch.device("meta"):
        twin = build()
    mapped = _assigned(twin, _named_tensors(real))
    assert mapped[1].weight is mapped[0].weight and not mapped[0].weight.requires_grad
    assert torch.equal(mapped.table, real.table)
    assert not any(t.is_meta for t in (*mapped.parameters(), *mapped.buffers()))
    x = torch.randn(2, 3)
    assert torch.equal(mapped(x), real(x))


# The shipped architecture configs: published parameter counts (diffusers' layouts), and what
# a cost run feeds them instead of text encoders. Built on the meta device: no weights in a test.
SHIPPED = [
    ("sd-1.5", 859_520_964, {"encoder_hidden_states": (77, 768)}),
    ("sdxl", 2_567_463_684, {"encoder_hidden_states": (77, 2048), "text_embeds": (1280,), "time_ids": (6,)}),
    ("pixart-sigma", 610_856_096, {"encoder_hidden_states": (300, 4096), "encoder_attention_mask": (300,)}),
    # The paper's 675.1M plus diffusers' per-block copies of the timestep and class embedders.
    ("dit-xl-2-256", 749_826_464, {"class_labels": ()}),
]


@pytest.mark.parametrize("name,params,conditions", SHIPPED, ids=[s[0] for s in SHIPPED])
def test_shipped_configs_are_the_published_architectures(name, params, conditions):
    """Each random-init model's denoiser has the published size and gets its conditioning at
    the published shapes: seeded tensors where its config ships no text encoder, else its own
    (random) text encoder's output; only a config that ships the VAE makes images."""
    import diffusers

    from bench.models.pipelines import random_pipeline_config
    from bench.models.random_parts import RandomPipeline
    from bench.spec import Sampling

    adapter_cls = MODELS.get(name)
    config = random_pipeline_config(adapter_cls.RANDOM_CONFIG)
    denoiser = config[adapter_cls.COMPONENT]
    with torch.device("meta"):
        model = getattr(diffusers, denoiser["_class_name"]).from_config(denoiser)
    assert sum(p.numel() for p in model.parameters()) == params
    adapter = adapter_cls(Sampling(device="cpu", batch_size=2, samples=2), init="random")
    adapter.__dict__["pipeline"] = RandomPipeline(
        config, torch.device("cpu"), **{adapter_cls.COMPONENT: model}
    )
    cond = adapter.conditions(0, 2)
    assert {k: tuple(v.shape[1:]) for k, v in cond.items()} == conditions
    assert all(len(v) == 4 for v in cond.values())  # guided: (unconditional, conditional) × 2
    if "encoder_hidden_states" in cond:  # seeded: the same prompt, the same tensor
        assert torch.equal(adapter.text_conditions(["a"])["encoder_hidden_states"],
                           adapter.text_conditions(["a"])["encoder_hidden_states"])  # fmt: skip
    if "encoder_attention_mask" in cond:
        assert bool((cond["encoder_attention_mask"] == 1).all())
    if adapter.pipeline.has("vae"):  # SD-1.5: the KL VAE, 8× upsampling
        assert adapter.decode(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 64, 64)
    else:
        with pytest.raises(ValueError, match="init: random has no VAE, so it makes no images"):
            adapter.decode(torch.zeros(1, 4, 8, 8))


def test_a_random_init_model_calibrates_without_a_decoder():
    # Cost runs of random-weight models quantize too: calibration runs the sampler loop only,
    # never the decoder a random-init pipeline lacks (its first GPU run failed there).
    import json
    from importlib import resources

    import diffusers
    from tiny_pipelines import cond_unet

    import qdiff
    from bench.models.pipelines import StableDiffusion15
    from bench.models.random_parts import RandomPipeline
    from bench.spec import Sampling

    config = json.loads(resources.files("bench.models.configs").joinpath("sd-1.5.json").read_text())
    for part in ("vae", "text_encoder", "tokenizer"):  # a UNet-only config, as a cost run's
        config.pop(part)
    config["conditions"] = {"encoder_hidden_states": [5, 16]}  # the tiny UNet's cross-attention width
    tiny = cond_unet().eval()
    config["unet"] = {**tiny.config, "_class_name": type(tiny).__name__}  # built from it, seeded
    scheduler = diffusers.PNDMScheduler.from_config(config["scheduler"])
    adapter = StableDiffusion15(Sampling(device="cpu", steps=4, batch_size=2, samples=2), init="random")
    adapter.__dict__["pipeline"] = RandomPipeline(config, torch.device("cpu"), unet=tiny, scheduler=scheduler)
    data = adapter.calibration_data(
        adapter.denoiser(), qdiff.CalibConfig(num_timesteps=2, samples_per_timestep=2)
    )
    assert data.x.shape == (8, 4, 8, 8)  # 2 steps × 2 trajectories, doubled by guidance
    assert data.cond["encoder_hidden_states"].shape == (8, 5, 16)
    with pytest.raises(ValueError, match="init: random has no VAE"):
        adapter.sample(adapter.denoiser(), 2, 0)


def test_resolution_must_be_a_multiple_of_16():
    flux = MODELS.get("flux")
    assert flux.arg_problems({"resolution": 1000}) == [
        "resolution=1000; give the image side in pixels, a multiple of 16 (e.g. 1024)"
    ]
    assert flux.arg_problems({"resolution": 512}) == []


def test_unknown_init_is_one_clear_error():
    from bench.models.pipelines import DDIMCifar10
    from bench.spec import Sampling

    with pytest.raises(ValueError, match="init='randn'; choose pretrained or random"):
        _ = DDIMCifar10(Sampling(device="cpu"), init="randn").pipeline


def test_single_file_checkpoints_load_through_from_single_file(tmp_path, tiny_pipelines, monkeypatch):
    """An original-format checkpoint goes to diffusers' from_single_file with its config folder
    (SD-1.5, SD3, FLUX, SDXL; a converted tiny pipeline stands in: diffusers writes no
    original-format files)."""
    import diffusers

    from bench.errors import MatrixError

    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"weights")
    for name in ("sd-1.5", "sd3", "flux", "sdxl"):
        pipeline_cls = getattr(diffusers, MODELS.get(name).SINGLE_FILE)
        calls = []

        def from_single_file(path, calls=calls, pipeline_cls=pipeline_cls, **kwargs):
            calls.append((path, dict(kwargs)))
            if "config" not in kwargs:
                raise OSError("cannot reach the hub for the config")
            config = kwargs.pop("config")
            return pipeline_cls.from_pretrained(config, **kwargs)

        monkeypatch.setattr(pipeline_cls, "from_single_file", from_single_file)
        args = {**_args(name, tiny_pipelines), "source": str(checkpoint), "config": str(tiny_pipelines[name])}
        adapter = MODELS.get(name)(SAMPLING, **args)
        assert adapter.sample(adapter.denoiser(), 2, seed=0).shape == (2, *SHAPES[name])
        assert calls[0][0] == str(checkpoint) and calls[0][1]["config"] == str(tiny_pipelines[name])
        offline = MODELS.get(name)(SAMPLING, source=str(checkpoint))
        with pytest.raises(AvailabilityError, match="offline, set config: to a folder"):
            offline.denoiser()
    # Models without single-file support, and missing files, fail at validate.
    text = (
        f"models: [{{name: ddim-cifar10, source: {checkpoint}}}, {{name: pixart-sigma, "
        f"source: {checkpoint}}}, {{name: sd-1.5, source: {checkpoint}, config: /no/configs}}]\n"
        "methods: [linear]\nbits: [W8A8]\nmetrics: [psnr_vs_fp]\n"
    )
    (tmp_path / "m.yaml").write_text(text)
    with pytest.raises(MatrixError) as info:
        load_matrix(tmp_path / "m.yaml")
    assert "single-file checkpoint, which ddim-cifar10 cannot load" in str(info.value)
    assert "single-file checkpoint, which pixart-sigma cannot load" in str(info.value)
    assert "config /no/configs: no such file or folder here" in str(info.value)


def test_the_random_models_tokenizer_is_clips():
    """``init: random`` SD-1.5 tokenizes with CLIP's own BPE (from open_clip's vocabulary file):
    the ids open_clip gives, then end-of-text padding as SD's tokenizer pads."""
    import open_clip

    from bench.models.random_parts import clip_tokenizer

    prompts = ["a red bicycle leaning against a brick wall", "Ünïcode, punctuation!? 1984"]
    ours = clip_tokenizer(77)(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    theirs = open_clip.tokenize(prompts).tolist()
    for a, b in zip(ours, theirs, strict=True):
        n = b.index(49407) + 1  # through end-of-text
        assert a[:n] == b[:n] and set(a[n:]) == {49407} and len(a) == 77
