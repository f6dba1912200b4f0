"""Test helpers shared by several modules."""

from __future__ import annotations

import dataclasses

import torch

from bench.contracts import calib_for  # noqa: F401  (the contracts' denoiser inputs, for the tests)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's test criterion)."""
    noise = (reference - approx).pow(2).mean()
    return (10 * torch.log10(reference.pow(2).mean() / noise)).item()


TINY_SETTINGS = (
    "{device: cpu, samples: 24, steps: 4, batch_size: 24, calib_timesteps: 2, calib_samples: 4, "
    "weight_iters: 3, act_iters: 2}"
)


def baseline_names() -> list[str]:
    """The methods the ``baselines`` package registers: all but FP, Q-Diffusion and its ablations
    (the objects ``bench.methods`` defines)."""
    import bench.methods
    from bench.registry import METHODS

    own = [id(v) for v in vars(bench.methods).values()]
    return [n for n in METHODS.names() if id(METHODS.get(n)) not in own]


def registered(monkeypatch, registry, obj, name: str | None = None) -> None:
    """``obj`` in ``registry`` for one test (under ``name``, default its own), replacing any entry."""
    registry.names()  # the registering modules first, so they cannot add the name back later
    monkeypatch.setitem(registry._entries, obj.name if name is None else name, obj)


def tiny_matrix(
    tmp_path, methods: str = "[linear, qdiff]", bits: str = "[W8A8, W4A8, W4A32]", **extra
) -> str:
    """A matrix file on the embedded model that runs in seconds (quality metrics only, unless
    ``metrics`` is given: the cost metrics have their own tests)."""
    from pathlib import Path

    extra.setdefault("metrics", "[digits_fd, psnr_vs_fp, quantize_time]")
    settings = extra.pop("settings", TINY_SETTINGS)  # given: replaces the tiny ones
    lines = [
        "name: tiny",
        "models: [embedded-digits]",
        f"methods: {methods}",
        f"bits: {bits}",
        f"settings: {settings}",
        *[f"{k}: {v}" for k, v in extra.items()],
    ]
    path = Path(tmp_path) / "tiny.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


class FailingMethod:
    """A method whose quantization fails the way a GPU run can (registered by tests only)."""

    name = "boom"
    description = "fails with CUDA out of memory"

    checkpointable = True
    backend = None

    def unsupported(self, bits):
        return None

    def unsupported_on(self, model):
        return None

    def bases(self, bits):
        return ()

    def configure(self, bits, budget):
        from bench.methods import QDIFFUSION

        return QDIFFUSION.configure(bits, budget)

    def quantize(self, denoiser, config, calibration, progress=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def refine(self, denoiser, bases, config, calibration, alphas_cumprod):
        raise TypeError("boom has no bases")

    def deploy(self, qmodel, backend):
        return qmodel


class InterruptingMethod(FailingMethod):
    """Stands in for a killed process: the interrupt is not an error of the run."""

    name = "interrupt"

    def quantize(self, denoiser, config, calibration, progress=None):
        raise KeyboardInterrupt


def die(spec, matrix):
    """A run function whose worker process dies (as if killed by the OOM killer)."""
    import os

    os._exit(3)


BOOM = FailingMethod()
INTERRUPT = InterruptingMethod()


def row(method, bits, metric, value, seed=0, status="ok", error=None, **extra):
    """A complete results row for a hand-made store (embedded-digits, matrix ``fixture``)."""
    from bench.store import COLUMNS

    w, a = {"FP": (None, None), "W8A8": (8, 8), "W4A8": (4, 8)}[bits]
    higher = metric == "psnr_vs_fp"
    return {
        **dict.fromkeys(COLUMNS),
        "run_id": f"{method}-{bits}-{seed}", "matrix": "fixture", "model": "embedded-digits",
        "method": method, "w_bits": w, "a_bits": a, "bits": bits, "seed": seed, "metric": metric,
        "value": value, "unit": "dB" if higher else "fd", "higher_is_better": higher,
        "kind": "cost" if metric == "quantize_time" else "quality", "n_samples": 100,
        "status": status, "error": error, "device": "cpu (test)", "torch": "2.x", "cuda": "none",
        "git_sha": "abc123", "config_hash": f"{method}-{bits}-{seed}",
        "reference_hash": None if method == "fp" else f"fp-FP-{seed}",
        "started_at": f"2026-01-01T00:00:0{seed}", "duration_s": 1.0,
        "sampling": {"steps": 5}, "budget": None if method == "fp" else {"weight_iters": 3}, **extra,
    }  # fmt: skip


def fixture_store(root, qdiff_w4=20.0):
    """FP, linear and qdiff at W8A8/W4A8 over two seeds, with one failed cell (linear W4A8)."""
    from bench.store import ResultStore

    store = ResultStore(root)
    for seed, fp_fd in ((0, 14.0), (1, 16.0)):
        store.append([row("fp", "FP", "digits_fd", fp_fd, seed, floor=10.0, floor_sd=1.0)])
        cells = {"linear": (40.0, 20.0, 0.5), "qdiff": (15.0, 30.0, 90.0)}
        for method, (fd, psnr, seconds) in cells.items():
            store.append([
                row(method, "W8A8", "digits_fd", fd + seed, seed),
                row(method, "W8A8", "psnr_vs_fp", psnr, seed),
                row(method, "W8A8", "quantize_time", seconds, seed),
            ])  # fmt: skip
        store.append([
            row("qdiff", "W4A8", "digits_fd", qdiff_w4 + seed, seed),
            row("qdiff", "W4A8", "psnr_vs_fp", 25.0, seed),
            row("qdiff", "W4A8", "quantize_time", 100.0, seed),
        ])  # fmt: skip
        failed = ("digits_fd", "psnr_vs_fp", "quantize_time")
        store.append(
            [row("linear", "W4A8", m, None, seed, status="error", error="RuntimeError: boom") for m in failed]
        )
    return root


def write_asv_results(root, machine="m1", cpu="Xeon", points=(("a" * 40, 0.5), ("b" * 40, 0.6))):
    """asv results as ``asv run`` writes them (asv's own writer): one unparametrised and one
    parametrised benchmark per commit, the second skipped for one parameter (as a GPU one on a
    CPU machine)."""
    from asv import util
    from asv.results import Results
    from asv.runner import BenchmarkResult

    (root / machine).mkdir(parents=True, exist_ok=True)
    util.write_json(str(root / machine / "machine.json"), {"machine": machine, "cpu": cpu, "version": 1}, 1)
    step = {"name": "bench_step.DenoiserStep.time_step", "params": [["'fp'", "'x86'"], ["'embedded'"]],
            "param_names": ["backend", "model"], "version": "1"}  # fmt: skip
    load = {"name": "bench_harness.Harness.time_load", "params": [], "param_names": [], "version": "1"}
    for i, (sha, value) in enumerate(points):
        params = {"machine": machine, "cpu": cpu, "python": "3.11"}
        results = Results(params, {}, sha, 1_700_000_000_000 + i * 1000, "3.11", "existing-py", {})
        results.add_result(load, BenchmarkResult([value], [[value]], [1], 0, "", None))
        results.add_result(step, BenchmarkResult([value, None], [[value], None], [1, 1], 0, "", None))
        results.save(str(root))
    return root


@dataclasses.dataclass(frozen=True)
class Scripted:
    """A run function for executor tests (picklable, so it reaches worker processes and Ray
    tasks): it records when each run starts and ends in ``folder``, holds FP runs of seed 0
    until ``others`` other runs have ended (``hold_s`` seconds at most: the test fails then, not
    on a busy machine's timing), and its worker dies as ``die`` says: ``once`` (the first
    attempt of every run), ``always``, ``fp`` (every attempt of FP runs)."""

    folder: str
    hold_s: float = 0.0
    others: int = 0
    die: str = ""

    def __call__(self, spec):
        import json
        import os
        import time
        from pathlib import Path

        folder = Path(self.folder)
        start = time.time()
        first = not (folder / f"attempt-{spec.hash}").exists()
        (folder / f"attempt-{spec.hash}").touch()
        if self.die == "always" or (self.die == "once" and first) or (self.die == "fp" and spec.is_fp):
            os._exit(3)
        while spec.is_fp and spec.seed == 0 and time.time() < start + self.hold_s:
            if len(list(folder.glob("ran-*.json"))) >= self.others:
                break
            time.sleep(0.05)
        (folder / f"ran-{spec.hash}.json").write_text(json.dumps([spec.label, start, time.time()]))
        return [{"status": "ok", "duration_s": time.time() - start, "label": spec.label, "pid": os.getpid()}]


@dataclasses.dataclass(frozen=True)
class Sleeper:
    """A run function that notes the Ray node it started on in ``folder`` and sleeps."""

    folder: str
    seconds: float

    def __call__(self, spec):
        import time
        from pathlib import Path

        import ray

        node = ray.get_runtime_context().get_node_id()
        (Path(self.folder) / f"started-{spec.hash}-{time.time():.3f}").write_text(node)
        time.sleep(self.seconds)
        return [{"status": "ok", "duration_s": self.seconds, "started_on": node}]


def build_in_process(cache: str, folder: str) -> tuple[float, bool]:
    """Get the cache entry ``test/key`` in a fresh process, building it slowly when missing
    (each build leaves a file in ``folder``): the value and whether it came from the cache."""
    import os
    import time
    from pathlib import Path

    os.environ["QDIFF_BENCH_CACHE"] = cache
    from bench.cache import cached_tensors

    def build():
        (Path(folder) / f"built-{os.getpid()}").touch()
        time.sleep(2)
        return {"x": torch.arange(3.0)}

    tensors, cached = cached_tensors("test", "key", build)
    return tensors["x"].sum().item(), cached


class GemmAndConvs(torch.nn.Module):
    """One layer of each GPU kernel path: a 3×3 conv (Triton or the float kernel), a 1×1 conv and
    a Linear (cuBLASLt's int8 GEMM), called ``model(x, t)`` as a denoiser is."""

    def __init__(self, c_in: int = 8, c: int = 32) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(c_in, c, 3, padding=1)
        self.pointwise = torch.nn.Conv2d(c, c, 1)
        self.linear = torch.nn.Linear(c, c // 2)

    def forward(self, x, t):
        y = self.pointwise(torch.nn.functional.silu(self.conv(x)))
        return self.linear(y.permute(0, 2, 3, 1))


def random_inception_weights(path) -> str:
    """torch-fidelity's Inception-v3 with seeded random weights, saved where ``inception_weights``
    can name it (built with its download and loading disabled)."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    torch.manual_seed(0)
    with (
        mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None),
    ):
        model = tfi.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=None
        )
    torch.save(model.state_dict(), path)
    return str(path)
