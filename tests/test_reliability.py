"""Hostile inputs of the fourth reliability pass (issue 44): each case once, each with the
behaviour a user needs (one line naming the problem and the fix; the matrix goes on)."""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path

import pytest

from qdiff.registry import Registry


def _package(tmp_path, monkeypatch, modules: dict[str, str]) -> str:
    """A package of registering modules on ``sys.path`` (a unique name: imports are cached)."""
    name = f"plugins_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / name
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    for module, source in modules.items():
        (folder / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


REGISTERS = "from {pkg} import REG\nclass M:\n    name = {name!r}\nREG.add(M())\n"


@pytest.mark.parametrize(
    "source, reason",
    [
        ("raise RuntimeError('no GPU driver')", "RuntimeError: no GPU driver"),
        ("import not_installed_anywhere", "ModuleNotFoundError: No module named 'not_installed_anywhere'"),
        ("import sys\nsys.exit(3)", "SystemExit: 3"),
    ],
)
def test_a_plugin_that_fails_to_import_is_one_line_and_the_rest_works(
    tmp_path, monkeypatch, caplog, source, reason
):
    pkg = _package(tmp_path, monkeypatch, {})
    reg = Registry("method", (pkg,))
    monkeypatch.setattr(__import__(pkg), "REG", reg, raising=False)
    (tmp_path / pkg / "good.py").write_text(REGISTERS.format(pkg=pkg, name="good"))
    # The broken module registers a name before failing: that half-registered name goes too.
    (tmp_path / pkg / "bad.py").write_text(REGISTERS.format(pkg=pkg, name="half") + source + "\n")
    with caplog.at_level(logging.WARNING, logger="qdiff.registry"):
        assert reg.names() == ["good"]
    [line] = [r.getMessage() for r in caplog.records]
    assert "\n" not in line and f"{pkg}/bad.py failed to import ({reason})" in line
    with pytest.raises(KeyError, match=f"unknown method 'half'.*{pkg}/bad.py failed to import"):
        reg.get("half")


def test_a_name_two_plugins_register_names_both_files_whichever_sorts_first(tmp_path, monkeypatch, caplog):
    pkg = _package(tmp_path, monkeypatch, {})
    reg = Registry("method", (pkg,))
    monkeypatch.setattr(__import__(pkg), "REG", reg, raising=False)
    for module in ("aa_impostor", "linear_quant"):
        (tmp_path / pkg / f"{module}.py").write_text(
            REGISTERS.format(pkg=pkg, name="linear") + REGISTERS.format(pkg=pkg, name=f"own_{module}")
        )
    with caplog.at_level(logging.WARNING, logger="qdiff.registry"):
        names = reg.names()
    assert names == ["own_aa_impostor", "own_linear_quant"]  # everything else of both stays
    [line] = [r.getMessage() for r in caplog.records]
    assert re.search(
        f"'linear' is registered by both \\S*{pkg}/aa_impostor.py and \\S*{pkg}/linear_quant.py", line
    )
    with pytest.raises(KeyError, match=r"registered by both .*aa_impostor\.py and .*linear_quant\.py"):
        reg.get("linear")


def test_the_cli_lists_what_loads_when_a_baseline_is_broken(tmp_path, monkeypatch, capsys, caplog):
    from bench import cli
    from bench.registry import METHODS

    pkg = _package(tmp_path, monkeypatch, {"broken": "raise RuntimeError('boom at import')\n"})
    METHODS.names()
    monkeypatch.setattr(METHODS, "modules", (*METHODS.modules, pkg))
    monkeypatch.setattr(METHODS, "_imported", False)
    monkeypatch.setattr(METHODS, "problems", {})
    with caplog.at_level(logging.WARNING, logger="qdiff.registry"):
        assert cli.main(["ls"]) == 0
    out, err = capsys.readouterr()
    assert "qdiff " in out and "linear " in out
    # One message on stderr (wrapped at 100 columns: its continuation lines are indented).
    assert err.splitlines()[0].strip() and all(line.startswith("    ") for line in err.splitlines()[1:])
    assert "failed to import (RuntimeError: boom at import)" in " ".join(err.split())
    [line] = [r.getMessage() for r in caplog.records]
    assert "broken.py failed to import (RuntimeError: boom at import)" in line


def test_a_claim_whose_pid_now_names_another_process_is_recovered(tmp_path):
    import json
    import os
    import socket

    from bench.fsio import process_start
    from bench.store import ResultStore

    store = ResultStore(tmp_path)
    path = store.claims / "abc.json"
    path.parent.mkdir(parents=True)
    old = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "time": 0,
        "start": process_start(os.getpid()) - 1,
    }
    path.write_text(json.dumps(old))  # this pid, alive, but started later than the claim's holder
    assert store.claim("abc") is None
    # A claim of this very process is live: not recovered, and named with who holds it ...
    assert store.claim("abc") == f"pid {os.getpid()} on {socket.gethostname()}"
    # ... unless taken over.
    assert store.claim("abc", force=True) is None


def test_a_second_run_while_the_first_holds_every_run_says_so_and_succeeds(tmp_path, capsys):
    from helpers import tiny_matrix

    from bench import cli
    from bench.matrix import load_matrix
    from bench.runner import plan
    from bench.store import ResultStore, load

    path = tiny_matrix(tmp_path, methods="[linear]", bits="[W8A8]")
    store = ResultStore(tmp_path / "results" / "tiny")
    runs = plan(load_matrix(path), store)
    for p in runs:  # the "first run" (this process, alive) holds them all
        assert store.claim(p.spec.hash) is None
    argv = ["run", path, "--results", str(tmp_path / "results"), "--no-progress", "--workers", "1"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert f"tiny: nothing to do here; in progress elsewhere: {len(runs)} run(s) by pid {os.getpid()}" in out
    assert "being done by" in err and str(store.claims / f"{runs[0].spec.hash}.json") in err
    with pytest.raises(Exception, match="a run is in progress"):
        load(store.root)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"matrix": {"name": "x"}}, "matrix must be a path to a YAML file or a MatrixSpec, got dict"),
        ({"results": 5}, "results must be a folder path"),
        ({"workers": "1"}, "workers must be a whole number from 1 to 1024.*got '1'"),
        ({"workers": 0}, "workers must be .*got 0"),
        ({"workers": -1}, "workers must be .*got -1"),
        ({"threads": -1}, "threads must be .*got -1"),
        ({"threads": 0}, "threads must be .*got 0"),
        ({"only": {"method": "qdiff"}}, "only must map axes to tuples"),
    ],
)
def test_api_run_names_the_argument_that_is_wrong(tmp_path, kwargs, message):
    from helpers import tiny_matrix

    from bench import api

    args = {"matrix": tiny_matrix(tmp_path), "results": tmp_path / "results", **kwargs}
    with pytest.raises(ValueError, match=message):
        api.run(args.pop("matrix"), args.pop("results"), **args)
    assert not (tmp_path / "results").exists()


def test_a_spec_renamed_out_of_the_results_root_is_refused(tmp_path):
    import dataclasses

    from helpers import tiny_matrix

    from bench.matrix import load_matrix

    spec = load_matrix(tiny_matrix(tmp_path))
    with pytest.raises(ValueError, match=r"name='\.\./\.\./x' must be ASCII letters"):
        dataclasses.replace(spec, name="../../x")


def _wrapped(name: str, change):
    """The registered ``linear`` method under ``name`` with ``change(model, fp)`` applied to the
    model it quantizes (what ``quantize`` returns is ``change``'s result)."""
    import dataclasses

    from bench.registry import METHODS

    linear = METHODS.get("linear")

    class Changed(type(linear)):
        def quantize(self, denoiser, config, calibration, progress=None):
            model, report = super().quantize(denoiser, config, calibration, progress)
            return change(model, denoiser), report

    return Changed(**{f.name: getattr(linear, f.name) for f in dataclasses.fields(linear)} | {"name": name})


def _nan_bias(model, fp):
    import torch

    last = [m for m in model.modules() if isinstance(getattr(m, "bias", None), torch.Tensor)][-1]
    last.bias = torch.nn.Parameter(torch.full_like(last.bias, float("nan")))  # not in place: shared with FP
    return model


def test_a_nan_metric_is_an_error_row_and_a_model_without_quantized_layers_too(tmp_path, monkeypatch):
    import copy

    from helpers import registered, tiny_matrix

    from bench import api
    from bench.registry import METHODS
    from bench.store import load

    registered(monkeypatch, METHODS, _wrapped("nanout", _nan_bias))
    registered(monkeypatch, METHODS, _wrapped("untouched", lambda model, fp: copy.deepcopy(fp)))
    path = tiny_matrix(tmp_path, methods="[nanout, untouched]", bits="[W8A8]",
                       metrics="[eps_mse, psnr_vs_fp]")  # fmt: skip
    outcome = api.run(path, tmp_path / "results", workers=1, report=True)
    rows = {(r["method"], r["metric"]): r for r in outcome.rows}
    nan = rows["nanout", "eps_mse"]
    assert nan["status"] == "error" and nan["error"].startswith("eps_mse is not a finite number (nan)")
    assert rows["nanout", "psnr_vs_fp"]["status"] == "ok"  # the run's other metric stands
    for metric in ("eps_mse", "psnr_vs_fp"):
        row = rows["untouched", metric]
        assert (
            row["status"] == "error" and "untouched returned a model with no quantized layer" in row["error"]
        )
    assert len(load(outcome.store.root)) == len(outcome.rows)


def _tables_intact(text: str) -> None:
    """Every Markdown table row has as many cells as its header (no stray '|' or line break)."""
    cells = None
    for line in text.splitlines():
        if not line.startswith("|"):
            cells = None
            continue
        n = len(re.findall(r"(?<!\\)\|", line))
        cells = cells or n
        assert n == cells, line


def test_markdown_tables_hold_any_label(tmp_path):
    import json

    from helpers import fixture_store

    from bench import history, report

    root = fixture_store(tmp_path / "fixture")
    for path in (root / "runs").glob("*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for r in rows:
            r.update(model="sd|v1\nbeta <b>", host="node|1\nx")
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    md, _, _ = report.write(root)
    text = md.read_text()
    assert "sd\\|v1 beta <b>" in text
    _tables_intact(text)
    md, _, _ = history.write(tmp_path, tmp_path / "history", tmp_path / "no-asv")
    assert "sd\\|v1 beta" in md.read_text()
    _tables_intact(md.read_text())


@pytest.mark.parametrize(
    "entry", ["symlink loop", "dangling link", "folder", "FIFO", "deep JSON", "not JSON"]
)
def test_an_odd_entry_among_the_run_files_is_one_line_naming_it(tmp_path, entry):
    from helpers import fixture_store

    from bench.errors import StoreError
    from bench.store import ResultStore, load

    root = fixture_store(tmp_path / "fixture")
    odd = root / "runs" / "x.jsonl"
    if entry == "symlink loop":
        odd.symlink_to(odd)
    elif entry == "dangling link":
        odd.symlink_to(tmp_path / "gone")
    elif entry == "folder":
        odd.mkdir()
    elif entry == "FIFO":
        os.mkfifo(odd)  # opening it would wait for a writer forever
    elif entry == "deep JSON":
        odd.write_text("[" * 5_000_000 + "]" * 5_000_000 + "\n")
    else:
        odd.write_bytes(b"\xff\xfe not text\n")
    for read in (load, lambda r: ResultStore(r).rows(), lambda r: ResultStore(r).completed()):
        with pytest.raises(StoreError) as info:
            read(root)
        message = str(info.value)
        assert "\n" not in message and str(odd) in message and "move that file out of" in message


def test_a_mapped_cache_entry_truncated_in_place_is_never_a_silent_death(tmp_path, monkeypatch, caplog):
    """Entries are read-only (a user's truncate fails); one truncated anyway (root, or after a
    chmod) under a process that maps it ends that process with the stack on stderr, and the
    next use finds the checksum wrong and rebuilds it."""
    import subprocess
    import sys

    script = f"""
import faulthandler, os, sys, torch
sys.path.insert(0, {os.getcwd()!r})
os.environ["QDIFF_BENCH_CACHE"] = {str(tmp_path / "cache")!r}
faulthandler.enable()  # as the command line and its worker processes do
from bench.cache import cache_dir, cached_tensors
cached_tensors("random-weights", "k", lambda: {{"w": torch.ones(1 << 22)}})
mapped, cached = cached_tensors("random-weights", "k", lambda: None)
assert cached
path = cache_dir() / "random-weights" / "k.safetensors"
assert not path.stat().st_mode & 0o222, "entries are written read-only"
if os.geteuid() != 0:
    try:
        os.truncate(path, 0)
    except PermissionError:
        print("refused", flush=True)
    path.chmod(0o644)
os.truncate(path, 64)
print(float(mapped["w"].sum()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -7, done  # SIGBUS
    # Not silent: the handler's report (cut short when torch's threads fault at once).
    assert done.stderr.startswith("Fatal Python error")
    import torch

    from bench.cache import cached_tensors

    monkeypatch.setenv("QDIFF_BENCH_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="qdiff-bench"):
        again, cached = cached_tensors("random-weights", "k", lambda: {"w": torch.ones(1 << 22)})
    assert not cached and float(again["w"].sum()) == 1 << 22
    assert "do not match the checksum" in caplog.text


@pytest.mark.parametrize("case", ["literal values", "aliases", "deep extends", "device", "cycle"])
def test_a_limit_names_its_real_cause(tmp_path, case):
    from bench.matrix import load_matrix

    head = "models: [embedded-digits]\nmethods: [linear]\nbits: [W8A8]\n"
    path = tmp_path / "m.yaml"
    if case == "literal values":
        path.write_text(head + "calib_seeds: [" + ", ".join(map(str, range(10_000))) + "]\n")
        expected = "'calib_seeds' holds 10,001 values, and a matrix file at most 10,000"
    elif case == "aliases":
        laughs = "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n"
        for i, name in enumerate("bcde"):
            prev = "abcd"[i]
            laughs += f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]\n"
        path.write_text(head + "settings: {x: {" + laughs.replace("\n", ", ").rstrip(", ") + "}}\n")
        expected = "YAML aliases nested in aliases expand it to more than 10,000 values"
    elif case == "deep extends":
        for i in range(1200):
            (tmp_path / f"p{i}.yaml").write_text(f"extends: p{i + 1}.yaml\n" if i < 1199 else head)
        path = tmp_path / "p0.yaml"
        expected = f"{path}: its 'extends' chain is more than 32 files long"
    elif case == "device":
        path.write_text(head + "extends: /dev/zero\n")
        expected = "extends '/dev/zero': /dev/zero is not a regular file (a device, FIFO or socket)"
    else:
        path.write_text(head + "extends: m.yaml\n")
        expected = "'extends' forms a cycle"
    with pytest.raises(ValueError) as info:
        load_matrix(path)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_fid_downloads_nothing_unless_asked_and_names_a_file_that_is_not_weights(
    tmp_path, capsys, monkeypatch
):
    from bench import cli

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for backend in ("torch-fidelity", "clean-fid"):
        assert cli.main(["fid", str(tmp_path), str(tmp_path), "--backend", backend]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "downloads nothing unless asked" in err and "--download" in err
    assert not (tmp_path / "torch-home").exists()  # no hub folder made, nothing fetched
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights\n")
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (32, 32), (i * 100, 0, 0)).save(images / f"{i}.png")
    for backend in ("torch-fidelity", "clean-fid"):
        argv = ["fid", str(images), str(images), "--backend", backend, "--inception-weights", str(notes)]
        assert cli.main([*argv, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"inception weights {notes} could not be loaded" in err, err


def test_the_store_scale_benchmark_builds_reruns_that_read_as_the_source(tmp_path):
    """bench.storescale's stores: reruns of the source's files, whose latest rows are the
    source's cells (one per run and metric), and a candidate one rerun ahead; its measurement
    of a command is the child's wall time and peak memory."""
    from helpers import fixture_store

    from bench import storescale
    from bench.store import ResultStore

    source = fixture_store(tmp_path / "fixture")
    cells = {(r["config_hash"], r["metric"]) for r in ResultStore(source).latest()}
    a, b = tmp_path / "a" / "fixture", tmp_path / "b" / "fixture"
    rows, files, size = storescale.build(source, a, 100)
    assert files == len(list((a / "runs").iterdir()))
    assert 100 <= rows < 104 and size == sum(p.stat().st_size for p in (a / "runs").iterdir())
    latest = ResultStore(a).latest()
    assert {(r["config_hash"], r["metric"]) for r in latest} == cells
    assert len(ResultStore(a).index()) == rows
    newest = max((a / "runs").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    storescale.candidate(a, b)
    rerun = len(newest.read_text().splitlines())
    assert len(ResultStore(b).index()) == rows + rerun
    assert sum(r["run_id"] == "rerun" for r in ResultStore(b).latest()) == rerun
    figures = storescale.measure(["--help"])
    assert figures["wall_s"] > 0 and 50 < figures["peak_rss_mib"] < 4096


PLUGIN_METHOD = """
import qdiff
from bench.methods import RecipeMethod, quant_specs
from bench.registry import METHODS
from bench.spec import Bits


def recipe(bits: Bits) -> qdiff.QConfig:
    return qdiff.QConfig(**quant_specs(bits, "mse"), split_shortcut=True,
                         calib=qdiff.CalibConfig(strategy="uniform"), recon=qdiff.ReconConfig(method="none"))


METHOD = METHODS.add(RecipeMethod("{name}", "{name}: MSE ranges, no reconstruction", recipe))
"""


def test_plugins_from_an_installed_package_and_a_folder_run_and_a_broken_one_is_one_line(tmp_path):
    """A throwaway package installed the way pip installs one (its dist-info with an entry point
    of the group ``qdiff_bench.methods``) and a folder named by ``--include`` each register a
    method; a matrix runs both, while a broken module of the folder is one line on stderr."""
    import subprocess
    import sys

    from helpers import tiny_matrix

    site = tmp_path / "site"
    (site / "extpkg").mkdir(parents=True)
    (site / "extpkg" / "__init__.py").write_text("")
    (site / "extpkg" / "methods.py").write_text(PLUGIN_METHOD.replace("{name}", "ext-installed"))
    info = site / "extpkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: extpkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[qdiff_bench.methods]\next = extpkg.methods\n")
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "mine.py").write_text(PLUGIN_METHOD.replace("{name}", "ext-folder"))
    (folder / "broken.py").write_text("raise ImportError('needs a library this machine lacks')\n")
    path = tiny_matrix(tmp_path, methods="[ext-installed, ext-folder]", bits="[W8A8]", metrics="[psnr_vs_fp]")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.getcwd()]),
        "QDIFF_BENCH_CACHE": str(tmp_path / "c"),
    }
    argv = [sys.executable, "-m", "bench.cli", "run", path, "--include", str(folder), "--workers", "1",
            "--results", str(tmp_path / "r"), "--no-progress", "--no-report", "--no-check"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    # One message (wrapped at 100 columns: its continuation lines are indented).
    messages = done.stderr.replace("\n    ", " ").splitlines()
    problems = [line for line in messages if "broken.py" in line]
    assert (
        len(problems) == 1
        and "failed to import (ImportError: needs a library this machine lacks)" in problems[0]
    )
    assert "Traceback" not in done.stderr
    from bench.store import load

    df = load(tmp_path / "r" / "tiny")
    assert set(df["method"]) == {"ext-installed", "ext-folder"} and set(df["status"]) == {"ok"}
    # The same folder named by the matrix file itself (relative to it), and one that is not there.
    text = Path(path).read_text()
    Path(path).write_text(text + "plugins: [plugins]\n")
    argv = [
        sys.executable,
        "-m",
        "bench.cli",
        "validate",
        path,
        "--no-estimate",
        "--results",
        str(tmp_path / "r"),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "valid; 2 runs (0 to run)" in done.stdout, done.stdout + done.stderr
    Path(path).write_text(text + "plugins: [elsewhere]\n")  # refused before anything loads: here
    from bench.errors import MatrixError
    from bench.matrix import load_matrix

    with pytest.raises(MatrixError, match="plugins: 'elsewhere': no such folder"):
        load_matrix(path)


def test_check_runs_the_contracts_on_one_name_and_names_what_broke(monkeypatch, capsys):
    """``qdiff-bench check NAME``: every contract check that applies, one line each; a method
    whose deployed model reports no kernels fails with the check's own words; exit 1."""
    import dataclasses

    from bench import cli
    from bench.registry import METHODS

    assert cli.main(["check", "linear"]) == 0
    out = capsys.readouterr().out
    assert "pass  method linear declares the contract" in out
    assert "linear: 3 passed, 0 skipped, 0 failed" in out

    linear = METHODS.get("linear")

    class NoKernels(type(linear)):
        def kernels(self, model):
            return {}

    fields = {f.name: getattr(linear, f.name) for f in dataclasses.fields(linear)}
    broken = NoKernels(**{**fields, "name": "no-kernels"})
    monkeypatch.setitem(METHODS._entries, "no-kernels", broken)
    assert cli.main(["check", "no-kernels"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  method no-kernels quantizes and deploys the embedded unet: kernels: {}" in out
    assert cli.main(["check", "lineer"]) == 2
    assert "did you mean 'linear'" in capsys.readouterr().err
