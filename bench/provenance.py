"""What produced a result: library versions, device, git commit, and content hashes."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import platform
import socket
import subprocess
from dataclasses import asdict, is_dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent


@cache
def git_sha() -> str:
    """The commit of the checkout the code runs from, with ``+dirty`` for uncommitted changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        # results/ is what runs write, not code: appending rows must not mark the code dirty.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"cpu ({platform.processor() or platform.machine()}, {threads} thread{'s' * (threads != 1)})"


# The vector-ISA flags that decide CPU kernel speed and numerics (recorded with every row).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8")


@cache
def cpu_info() -> tuple[str, str]:
    """The CPU's model name and which of :data:`CPU_FLAGS` it has (Linux; else ``platform``)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine(), ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return model or platform.machine(), " ".join(f for f in CPU_FLAGS if f in flags)


def environment(device: torch.device) -> dict[str, str]:
    model, flags = cpu_info()
    return {
        "cpu_model": model,
        "cpu_flags": flags,
        "device": device_name(device),
        "host": socket.gethostname(),  # on a cluster, with the ``node`` the run was placed on
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "diffusers": _version("diffusers"),
        "triton": _version("triton"),
        "openvino": _version("openvino"),  # the openvino backend and compile mode, nncf-ptq
        # The CPU's vector ISA decides which int8 kernels run (and whether they are exact).
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "git_sha": git_sha(),
    }


# The distribution's packages (pyproject.toml's ``packages.find``): all the code a run executes
# besides its dependencies, whose versions the rows record.
PACKAGES = ("qdiff", "baselines", "bench")

# Code no cached artefact (FP and quantized samples, calibration inputs, checkpoints) depends on:
# it plans, schedules, stores, reads or presents runs. Editing it (a report's CSS, a CLI message)
# keeps the cache; every other file of :data:`PACKAGES`, a new one included, is in the key.
NOT_IN_ARTEFACTS = (
    "bench/api.py", "bench/claims.py", "bench/cli.py", "bench/compare.py", "bench/estimate.py",
    "bench/estimatecheck.py",
    "bench/history.py", "bench/progress.py", "bench/ray_executor.py", "bench/scaleout.py",
    "bench/store.py", "bench/report/", "bench/runner/__init__.py",
    "bench/runner/executors.py", "bench/runner/plan.py",
)  # fmt: skip


@cache
def code_hash() -> str:
    """Hash of the Python sources that make the cached artefacts, where they are imported from
    (a checkout or site-packages): every file of :data:`PACKAGES` but :data:`NOT_IN_ARTEFACTS`.
    Cache keys include it, so a cached artefact is only reused by the code that made it; deriving
    it from the packages leaves no list of files to forget one in (a new module is hashed)."""
    return packages_hash(PACKAGES, NOT_IN_ARTEFACTS)


@cache
def all_code_hash() -> str:
    """Hash of every Python source of :data:`PACKAGES`: a Ray node must run the driver's code."""
    return packages_hash(PACKAGES)


def packages_hash(packages: tuple[str, ...], exclude: tuple[str, ...] = ()) -> str:
    """Hash of the paths and bytes of every ``.py`` file of importable ``packages``, but those
    whose package-relative path (``pkg/mod.py``) is in ``exclude`` or under a folder
    (``pkg/sub/``) there."""
    h = hashlib.sha256()
    for name in packages:
        spec = importlib.util.find_spec(name)
        for root in map(Path, spec.submodule_search_locations):
            for path in sorted(root.rglob("*.py")):
                rel = path.relative_to(root.parent).as_posix()
                if rel in exclude or any(e.endswith("/") and rel.startswith(e) for e in exclude):
                    continue
                h.update(rel.encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


def config_hash(*parts: Any) -> str:
    """Stable short hash of JSON-able parts (dataclasses are expanded)."""

    def plain(obj: Any) -> Any:
        if is_dataclass(obj) and not isinstance(obj, type):
            return {"__type__": type(obj).__name__, **asdict(obj)}
        return obj

    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_hash(model: nn.Module) -> str:
    """Hash of a model's parameters and buffers (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
