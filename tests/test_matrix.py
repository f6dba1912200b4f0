"""Matrix files: expansion, rules, extends, stable hashes, and one clear error per bad input."""

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import baseline_names, registered, tiny_matrix

from bench.errors import MatrixError
from bench.matrix import load_matrix, parse_rules
from bench.provenance import REPO_ROOT


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def cells(matrix):
    return [(r.model, r.method, r.bits_label, r.seed) for r in matrix.expand()]


def test_cartesian_expansion_with_paired_fp_first_grouped_by_method(tmp_path):
    m = load_matrix(write(tmp_path, """
        models: [embedded-digits]
        methods: [qdiff, linear]
        bits: [W4A32, W8A8, W4A8]
        seeds: [0, 1]
    """))  # fmt: skip
    got = cells(m)
    assert got[:2] == [("embedded-digits", "fp", "FP", 0), ("embedded-digits", "fp", "FP", 1)]
    quant = got[2:]
    assert len(quant) == 2 * 3 * 2 and len(set(quant)) == len(quant)
    assert [c[1] for c in quant] == ["qdiff"] * 6 + ["linear"] * 6  # grouped by method, in file order
    fp = m.expand()[0]
    # FP: no quantized-only metrics (psnr_vs_fp, quantize_time)
    assert fp.metrics == ("digits_fd", "latency_step", "peak_memory", "weight_bytes") and fp.budget is None
    assert all(r.fp_reference().hash in {fp.hash, m.expand()[1].hash} for r in m.expand()[2:])


def test_exclude_include_and_shell_patterns(tmp_path):
    m = load_matrix(write(tmp_path, """
        models: [embedded-digits]
        methods: [linear, qdiff, qdiff-no-split]
        bits: [W8A8, W4A8]
        exclude:
          - {method: "qdiff-*", bits: W8A8}
          - {method: linear, bits: [W4A8]}
        include:
          - {method: qdiff, bits: [W3A8, W8A8]}
    """))  # fmt: skip
    quant = {(c[1], c[2]) for c in cells(m) if c[1] != "fp"}
    assert quant == {
        ("linear", "W8A8"), ("qdiff", "W8A8"), ("qdiff", "W4A8"), ("qdiff-no-split", "W4A8"),
        ("qdiff", "W3A8"),
    }  # fmt: skip


def test_extends_merges_settings_and_axis_overrides(tmp_path):
    write(tmp_path, """
        methods: [linear]
        bits: [W8A8]
        settings: {samples: 100, steps: 10, weight_iters: 50}
    """, "base.yaml")  # fmt: skip
    m = load_matrix(write(tmp_path, """
        name: child
        extends: base.yaml
        models: [{name: embedded-digits, samples: 40}]
        methods: [linear, {name: qdiff, weight_iters: 7}]
        settings: {steps: 5}
    """))  # fmt: skip
    runs = {r.method: r for r in m.expand()}
    assert m.name == "child"
    assert runs["qdiff"].sampling.samples == 40 and runs["qdiff"].sampling.steps == 5  # model, child
    assert runs["linear"].budget.weight_iters == 50 and runs["qdiff"].budget.weight_iters == 7
    assert runs["fp"].sampling == runs["linear"].sampling


def test_run_hash_is_stable_across_processes_and_ignores_matrix_name(tmp_path):
    a = load_matrix(write(tmp_path, "name: a\nmodels: [embedded-digits]\nmethods: [qdiff]\nbits: [W4A8]\n"))
    b = load_matrix(
        write(tmp_path, "name: b\nmodels: [embedded-digits]\nmethods: [qdiff]\nbits: [W4A8]\n", "b.yaml")
    )
    assert [r.hash for r in a.expand()] == [r.hash for r in b.expand()]
    code = (
        "from bench.matrix import load_matrix; import sys; "
        "print(' '.join(r.hash for r in load_matrix(sys.argv[1]).expand()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "m.yaml")], capture_output=True, text=True
    )
    assert out.stdout.split() == [r.hash for r in a.expand()]
    c = load_matrix(
        write(tmp_path, "models: [embedded-digits]\nmethods: [qdiff]\nbits: [W4A8]\nseeds: [1]\n", "c.yaml")
    )
    assert c.expand()[-1].hash != a.expand()[-1].hash


def test_shipped_matrices_are_valid():
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        assert load_matrix(path).expand(), path
    default = load_matrix(REPO_ROOT / "configs" / "default.yaml")
    assert {r.method for r in default.expand()} == {"fp", "linear", "qdiff", "qdiff-no-recon"}
    assert {r.calib_seed for r in default.expand() if not r.is_fp} == {0, 1, 2}
    ablations = load_matrix(REPO_ROOT / "configs" / "ablations.yaml")
    assert {r.method for r in ablations.expand()} == {
        "fp",
        "qdiff",
        "qdiff-no-calib",
        "qdiff-no-split",
        "qdiff-asym",
    }
    # The ablations share the default's qdiff W4A8 runs (same hashes: same cache, same numbers).
    shared = {r.hash for r in default.expand()} & {r.hash for r in ablations.expand()}
    assert len(shared) == 4  # FP and qdiff W4A8 at the three calibration seeds
    baselines = load_matrix(REPO_ROOT / "configs" / "baselines.yaml")
    assert {
        r.hash for r in default.expand() if r.method in ("fp", "qdiff") and r.bits_label in ("FP", "W4A8")
    } <= {r.hash for r in baselines.expand()}
    full = load_matrix(REPO_ROOT / "configs" / "full.yaml")
    # Every registered baseline except the CUDA-only torchao presets; the symmetric-attention
    # variants have their own matrix, which measures them against their bases.
    cuda_only = {"torchao-int4wo", "torchao-fp8dq-row"}
    assert {r.method for r in full.expand()} >= {"fp", "qdiff", *baseline_names()} - cuda_only - {
        "linear-symattn"
    }
    grids = load_matrix(REPO_ROOT / "configs" / "attention-grids.yaml")
    assert {r.method for r in grids.expand()} == {"fp", "linear", "linear-symattn", "qdiff", "qdiff-symattn"}
    assert {r.bits_label for r in full.expand()} == {"FP", "W8A8", "W8A32", "W4A8", "W4A4", "W4A32"}
    paper = load_matrix(REPO_ROOT / "configs" / "paper-cifar10.yaml")
    # nncf-ptq runs on OpenVINO's CPU runtime; the paper matrices run on CUDA.
    cuda_methods = {r.method for r in full.expand()} - {"qdiff-asym", "nncf-ptq"}
    assert {r.method for r in paper.expand()} >= cuda_methods


def test_calibration_seeds_are_an_axis_of_quantized_runs(tmp_path):
    m = load_matrix(
        write(tmp_path, "models: [embedded-digits]\nmethods: [qdiff]\nbits: [W4A8]\nseeds: [0, 1]\n"
              "calib_seeds: [0, 5]\nexclude: [{calib_seed: 5, seed: 1}]\n")
    )  # fmt: skip
    cells = sorted((r.method, r.seed, r.calib_seed) for r in m.expand())
    assert cells == [("fp", 0, None), ("fp", 1, None), ("qdiff", 0, 0), ("qdiff", 0, 5), ("qdiff", 1, 0)]
    runs = {(r.seed, r.calib_seed): r for r in m.expand() if not r.is_fp}
    # Distinct runs, each paired with the FP run of its sampling seed.
    assert len({r.hash for r in runs.values()}) == 3
    assert runs[(0, 0)].fp_reference() == runs[(0, 5)].fp_reference()
    from bench.methods import QDIFFUSION
    from bench.spec import Bits

    configs = {c: QDIFFUSION.configure(Bits(4, 8), runs[(0, c)].budget) for c in (0, 5)}
    assert configs[5].calib.seed == configs[0].calib.seed + 5 and configs[5].recon.seed == 5
    with pytest.raises(MatrixError, match="'calib_seeds' lists a seed twice"):
        load_matrix(write(tmp_path, OK + "calib_seeds: [1, 1]\n", "d.yaml"))


OK = "models: [embedded-digits]\nmethods: [qdiff]\nbits: [W4A8]\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "models: [embedded-digits\nmethods: [qdiff]\n",
            "m.yaml: line 2, column 8: malformed YAML: expected",
        ),
        (
            "models: [embedded-digits]\nmethod: [qdiff]\n",
            "unknown key 'method' (did you mean 'methods'?); valid: name, description",
        ),
        (OK.replace("qdiff", "qdif"), "methods[0]: unknown method 'qdif' (did you mean 'qdiff'?)"),
        (OK.replace("embedded", "embeded"), "did you mean 'embedded-digits'?"),
        (OK.replace("W4A8", "W4"), "bits[0]: bit width 'W4' is not of the form"),
        (OK + "settings: {sample: 3}", "unknown setting 'sample' (did you mean 'samples'?); valid: samples"),
        (OK + "settings: {samples: many}", "samples='many' must be an integer"),
        (
            OK + "exclude: [{methods: x}]",
            "exclude[0]: a rule is a mapping with keys from model, method, bits",
        ),
        (
            OK.replace("[embedded-digits]", "[{name: embedded-digits, source: x}]"),
            "models[0] (embedded-digits): unknown key 'source'",
        ),
        (OK + "metrics: [fdi]", "metrics[0]: unknown metric 'fdi' (did you mean 'fid'?)"),
        (
            OK.replace("embedded-digits", "sd-1.5") + "metrics: [digits_fd]",
            "digits_fd needs a model with digit-features; sd-1.5 has text-to-image",
        ),
        (OK + "extends: me.yaml", "does not exist"),
        (OK + "extends: .", "is a folder, not a matrix file"),
        (OK + "methods: [linear]", "key 'methods' is given twice in one mapping (first on line 2); keep one"),
        (OK + "seeds: [0, 1]\nseeds: [2]", "key 'seeds' is given twice"),
        (OK + "extends: m.yaml", "'extends' forms a cycle"),
        (OK + "exclude: [{method: qdiff}]", "expands to no runs"),
        (OK + "settings: {backend: int3}", "backend='int3' is not valid; choose one of fake"),
        (OK.replace("[qdiff]", "[qdiff, {name: qdiff}]"), "'methods' lists qdiff more than once"),
        (
            OK + "settings: {fid_backend: pytorch-fid}",
            "fid_backend='pytorch-fid' is not valid; choose one of torch-fidelity",
        ),
        (
            OK + "settings: {fid_mode: tf}",
            "fid_mode='tf' is not valid; choose one of clean, legacy_pytorch, legacy_tensorflow",
        ),
        (OK + "settings: {latency_repeats: 0}", "latency_repeats=0 must be > 0"),
        (OK + "settings: {latency_warmup: -1}", "latency_warmup=-1 must be >= 0"),
        (OK + "settings: {compile: true}", "compile=True must be a string"),
        (OK + "backends: [int3]", "backends[0]: unknown backend 'int3'; choose from fake, x86"),
        (
            OK + "settings: {dtype: half}",
            "dtype='half' is not valid; choose one of float32, float16, bfloat16",
        ),
        (
            OK.replace("W4A8", "W4A32") + "settings: {backend: x86, device: cpu}",
            "qdiff [x86] W4A32 seed=0 calib=0: backend x86 needs quantized activations (WxA8 or narrower), "
            "not WxA32; choose another backend",
        ),
        (
            OK + "settings: {backend: int8, device: cpu}",
            "backend int8 runs on a CUDA GPU, not on device 'cpu'",
        ),
        (
            OK + "include: [{method: qdiff, bits: W8A8, backend: fp9}]",
            "include[0]: unknown backend 'fp9'",
        ),
        (
            OK.replace("[embedded-digits]", "[{name: embedded-digits, metrics: [fdi]}]"),
            "models[0].metrics[0]: unknown metric 'fdi'",
        ),
        (
            OK + "metrics: [inception_score]\nsettings: {fid_backend: clean-fid}",
            "metric inception_score: clean-fid does not compute the Inception Score",
        ),
        (OK + "settings: {eta: .nan}", "setting eta=nan must be a finite number"),
        (OK + "settings: {eta: -5}", "setting eta=-5 must be >= 0"),
        (OK + "settings: {eta: 2}", "setting eta=2 is outside DDIM's [0, 1]"),
        (OK + "settings: {weight_lr: .inf}", "setting weight_lr=inf must be a finite number"),
        (OK + "settings: {steps: 5000}", "steps=5000 exceeds the 1000 timesteps embedded-digits was trained"),
        (OK + "settings: {samples: 1000000000000}", "need at least"),
        (OK + "seeds: [100000000000000000000]", "'seeds' must be a list of integers in [0, 2^31)"),
    ],
)
def test_bad_matrix_is_one_clear_error(tmp_path, text, message):
    with pytest.raises(MatrixError) as info:
        load_matrix(write(tmp_path, text))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(tmp_path / "m.yaml") in str(info.value) or "does not exist" in message


def test_hostile_yaml_is_refused_in_one_line_before_it_costs_time_or_memory(tmp_path):
    """Nested anchors (a "billion laughs": nine levels of nine aliases) and bytes that are not
    UTF-8 each give one line naming the problem and the fix, at once."""
    import time

    rows = ["  - &a0 [0, 0, 0, 0, 0, 0, 0, 0, 0]"]
    rows += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    nested = "\n".join(rows)
    bomb = write(tmp_path, OK + "seeds:\n" + nested + "\n")
    start = time.perf_counter()
    with pytest.raises(MatrixError) as info:
        load_matrix(bomb)
    assert time.perf_counter() - start < 5
    assert "expand it to more than 10,000 values" in str(info.value) and "\n" not in str(info.value)
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes(OK.encode() + "description: Gr\xfc\xdfe\n".encode("latin-1"))
    message = r"latin1.yaml: not UTF-8 text \(byte \d+: b'\\xfc'\); save it as UTF-8$"
    with pytest.raises(MatrixError, match=message):
        load_matrix(latin)


def test_weight_only_method_rejects_activation_bits(tmp_path, monkeypatch):
    from dataclasses import replace

    from bench.registry import METHODS

    registered(monkeypatch, METHODS, replace(METHODS.get("linear"), weight_only=True))
    path = write(tmp_path, "models: [embedded-digits]\nmethods: [linear]\nbits: [W4A8]\n")
    with pytest.raises(MatrixError, match=r"linear quantizes weights only; use W4A32, or exclude"):
        load_matrix(path)


def test_backends_axis_deploys_each_quantized_run_on_each_backend(tmp_path):
    text = (
        "models: [{name: embedded-digits, metrics: [latency_step]}]\n"
        "methods: [linear, {name: qdiff, backend: x86}, torchao-int8dq]\n"
        "bits: [W8A8, W4A32]\nbackends: [fake, x86]\n"
        "exclude: [{bits: W4A32, backend: x86}, {method: torchao-int8dq, bits: W4A32}]\n"
        "include: [{method: linear, bits: W4A8, backend: x86}]\n"
        "settings: {device: cpu}\n"
    )
    runs = load_matrix(write(tmp_path, text)).expand()
    labels = {r.label for r in runs}
    assert labels == {
        "embedded-digits fp FP seed=0",
        "embedded-digits linear W8A8 seed=0 calib=0",
        "embedded-digits linear [x86] W8A8 seed=0 calib=0",
        "embedded-digits linear W4A32 seed=0 calib=0",
        "embedded-digits linear [x86] W4A8 seed=0 calib=0",  # the include names its backend
        "embedded-digits qdiff [x86] W8A8 seed=0 calib=0",  # the method entry's own backend wins
        "embedded-digits torchao-int8dq W8A8 seed=0 calib=0",  # deploys itself: one run
    }
    assert all(r.metrics == ("latency_step",) for r in runs)  # the model's own metric list
    by_label = {r.label: r for r in runs}
    # One calibrated model, two deployments: the runs differ by their backend only.
    fake, x86 = (
        by_label["embedded-digits linear W8A8 seed=0 calib=0"],
        by_label["embedded-digits linear [x86] W8A8 seed=0 calib=0"],
    )
    assert fake.hash != x86.hash and dataclasses.replace(x86.budget, backend="fake") == fake.budget
    assert x86.matches({"backend": ("x86",)}) and not fake.matches({"backend": ("x86",)})


def test_only_rules():
    assert parse_rules(["method=qdiff*", "bits=W4A8,W4A32", "method=fp"]) == {
        "method": ("qdiff*", "fp"), "bits": ("W4A8", "W4A32")
    }  # fmt: skip
    with pytest.raises(MatrixError, match="keys: model, method, bits, seed, calib_seed"):
        parse_rules(["methods=qdiff"])


def test_only_the_evaluation_settings_a_run_uses_are_hashed(tmp_path):
    def run(settings: str, metrics: str = "[digits_fd, fid]"):
        text = f"models: [embedded-digits]\nmethods: [qdiff]\nbits: [W4A8]\nmetrics: {metrics}\n"
        return load_matrix(write(tmp_path, text + f"settings: {settings}")).expand()[-1]

    base = run("{}")
    used = {"fid_backend": "torch-fidelity", "fid_mode": "clean", "fid_extractor": "inception"}
    assert base.evaluation_used() == {**used, "fid_reference": ""}
    assert run("{clip_model: ViT-B-16}").hash == base.hash  # no CLIP metric in this run
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")
    assert run(f"{{inception_weights: {weights}}}").hash == base.hash  # where, not which, weights
    assert run("{fid_backend: clean-fid}").hash != base.hash
    assert run("{latency_repeats: 3}", "[latency_step]").hash != run("{}", "[latency_step]").hash
    assert base.fields()["evaluation"] == base.evaluation_used()


def test_evaluation_overrides_per_model_and_from_the_command_line(tmp_path):
    m = load_matrix(write(tmp_path, """
        models: [{name: embedded-digits, fid_reference: /data/digits}]
        methods: [qdiff]
        bits: [W4A8]
        settings: {fid_backend: clean-fid}
    """))  # fmt: skip
    assert {(r.evaluation.fid_reference, r.evaluation.fid_backend) for r in m.expand()} == {
        ("/data/digits", "clean-fid")
    }
    flagged = m.with_evaluation(inception_weights="/w.pt")
    assert {r.evaluation.inception_weights for r in flagged.expand()} == {"/w.pt"}
    assert [r.hash for r in flagged.expand()] == [r.hash for r in m.expand()]


def test_every_problem_is_reported_at_once_with_suggestions(tmp_path):
    text = "models: [embedded-digit]\nmethods: [lineer, qdiff]\nbits: [W4A8, W9A99]\nsetings: {}\n"
    with pytest.raises(MatrixError) as info:
        load_matrix(write(tmp_path, text))
    assert "unknown key 'setings' (did you mean 'settings'?)" in str(info.value)  # the file's keys first
    text = "models: [embedded-digit]\nmethods: [lineer, qdiff]\nbits: [W4A8, W9A99]\nsettings: {sample: 3}\n"
    with pytest.raises(MatrixError) as info:
        load_matrix(write(tmp_path, text))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'm.yaml'}: 4 problems:\n")
    for needle in ("'embedded-digit'", "did you mean 'embedded-digits'", "'lineer'", "did you mean 'linear'",
                   "bits[1]", "unknown setting 'sample' (did you mean 'samples'?)"):  # fmt: skip
        assert needle in message


def test_a_value_that_is_not_a_list_is_one_problem_among_the_others(tmp_path):
    """``seeds: 0.5`` used to end the collection at once and hide the file's other problems."""
    text = "models: [embedded-digits]\nmethods: [lineer]\nbits: [W4A8]\nseeds: 0.5\ncalib_seeds: 1.5\n"
    with pytest.raises(MatrixError) as info:
        load_matrix(write(tmp_path, text))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'm.yaml'}: 3 problems:\n")
    for key in ("seeds", "calib_seeds"):
        assert f"'{key}' must be a list, got float" in message
    assert "'lineer'" in message


def test_a_rule_that_matches_no_run_is_an_error(tmp_path):
    text = "models: [embedded-digits]\nmethods: [linear]\nbits: [W4A8]\nexclude: [{method: lineer}]\n"
    with pytest.raises(MatrixError, match=r"exclude\[0\] \{method: lineer\} matches no run"):
        load_matrix(write(tmp_path, text))


def test_extends_is_relative_replaces_lists_merges_settings_and_says_what_it_inherited(tmp_path):
    (tmp_path / "base").mkdir()
    write(tmp_path / "base", "models: [embedded-digits]\nmethods: [linear, qdiff]\nbits: [W4A8, W4A4]\n"
          "exclude: [{method: qdiff, bits: W4A4}]\nsettings: {samples: 8, steps: 4}\n", "p.yaml")  # fmt: skip
    child = write(tmp_path, "extends: base/p.yaml\nmethods: [linear]\nexclude: []\nsettings: {steps: 5}\n")
    matrix = load_matrix(child)
    assert {r.method for r in matrix.expand()} == {"fp", "linear"}  # 'methods' replaced whole
    run = matrix.expand()[-1]
    assert (run.sampling.samples, run.sampling.steps) == (8, 5)  # settings merged key by key
    (inherited,) = [n for n in matrix.notes if n.startswith("inherited from")]
    assert str(tmp_path / "base" / "p.yaml") in inherited
    assert "models" in inherited and "bits" in inherited and "settings.samples" in inherited
    assert "exclude" not in inherited and "settings.steps" not in inherited
    # The parent's exclude rule no longer matches once the child drops qdiff: said, not ignored.
    child.write_text("extends: base/p.yaml\nmethods: [linear]\n")
    with pytest.raises(MatrixError, match="inherited through 'extends'"):
        load_matrix(child)
    child.write_text("extends: p.yaml\nmethods: [linear]\n")
    with pytest.raises(MatrixError, match="relative to the extending file's folder"):
        load_matrix(child)


def test_budget_is_stated_and_presets_are_named(tmp_path):
    base = "models: [embedded-digits]\nmethods: [qdiff]\nbits: [W4A8]\n"
    paper = load_matrix(write(tmp_path, base))
    assert "budget: the paper's (no preset and no budget settings)" in paper.notes[-1]
    assert "20 timesteps × 256" in paper.notes[-1] and "preset: quick" in paper.notes[-1]
    quick = load_matrix(write(tmp_path, base + "preset: quick\nsettings: {weight_iters: 50}\n"))
    assert quick.notes[-1].startswith("budget: preset quick with weight_iters set: 10 timesteps × 40")
    assert quick.expand()[-1].budget.weight_iters == 50  # settings win over the preset
    with pytest.raises(MatrixError, match="unknown preset 'quik' \\(did you mean 'quick'\\?\\)"):
        load_matrix(write(tmp_path, base + "preset: quik\n"))
    # The default matrix is the quick preset: naming it changed no run's hash.
    default = load_matrix(REPO_ROOT / "configs" / "default.yaml")
    assert default.notes[-1].startswith("budget: preset quick:")


def test_local_paths_are_checked_before_anything_runs(tmp_path):
    text = (
        "models: [{name: sd-1.5, source: ./weights/sd15, prompts: /no/prompts.txt}]\n"
        "methods: [linear]\nbits: [W8A8]\nmetrics: [fid]\n"
        "settings: {device: cpu, fid_reference: /no/reference, samples: 4}\n"
    )
    with pytest.raises(MatrixError) as info:
        load_matrix(write(tmp_path, text))
    message = str(info.value)
    assert "source ./weights/sd15: no such file or folder here" in message
    assert "prompts /no/prompts.txt: no such file here" in message
    assert "fid_reference /no/reference: no such file or folder here" in message
    # A hub id and a registered data set are not paths; an existing folder is fine.
    (tmp_path / "ref").mkdir()
    ok = text.replace("./weights/sd15", "org/model").replace(", prompts: /no/prompts.txt", "")
    load_matrix(write(tmp_path, ok.replace("/no/reference", str(tmp_path / "ref"))))
    load_matrix(write(tmp_path, ok.replace("/no/reference", "cifar10-train")))


def test_the_compile_axis_times_every_run_each_way_and_pairs_like_with_like(tmp_path):
    path = tiny_matrix(
        tmp_path, "[linear]", "[W8A8]", metrics="[digits_fd, latency_step]", compile="[off, inductor]"
    )
    matrix = load_matrix(path)
    by = {(r.method, r.evaluation.compile): r for r in matrix.expand()}
    assert set(by) == {("fp", "off"), ("fp", "inductor"), ("linear", "off"), ("linear", "inductor")}
    # The first mode measures everything; the other re-measures only what reads ``compile``.
    assert by["linear", "off"].metrics == ("digits_fd", "latency_step")
    assert by["linear", "inductor"].metrics == by["fp", "inductor"].metrics == ("latency_step",)
    assert by["linear", "inductor"].fp_reference().hash == by["fp", "inductor"].hash
    assert by["linear", "off"].fp_reference().hash == by["fp", "off"].hash
    with pytest.raises(MatrixError, match="list each of off, inductor, eager, openvino at most once"):
        load_matrix(tiny_matrix(tmp_path, compile="[off, turbo]"))
    with pytest.raises(MatrixError, match="both an axis and a setting"):
        load_matrix(tiny_matrix(tmp_path, compile="[inductor]", settings="{compile: inductor}"))


def test_compiled_fp_is_timed_even_where_the_quantized_runs_of_that_mode_are_excluded(tmp_path):
    path = tiny_matrix(
        tmp_path, "[linear]", "[W8A8]", metrics="[latency_step]", compile="[off, inductor]",
        exclude="[{method: linear, compile: inductor}]",
    )  # fmt: skip
    runs = {(r.method, r.evaluation.compile) for r in load_matrix(path).expand()}
    assert runs == {("fp", "off"), ("fp", "inductor"), ("linear", "off")}
    # Unless a rule names fp: a mode the model cannot run in at all (SDXL on OpenVINO).
    path = tiny_matrix(
        tmp_path, "[linear]", "[W8A8]", metrics="[latency_step]", compile="[off, inductor]",
        exclude="[{method: [linear, fp], compile: inductor}]",
    )  # fmt: skip
    assert {(r.method, r.evaluation.compile) for r in load_matrix(path).expand()} == {
        ("fp", "off"), ("linear", "off")
    }  # fmt: skip
    path = tiny_matrix(
        tmp_path, "[linear]", "[W8A8]", metrics="[latency_step]", compile="[off, inductor]",
        exclude="[{method: fp, compile: openvino}]",
    )  # fmt: skip
    with pytest.raises(MatrixError, match=r"exclude\[0\] \{method: fp, compile: openvino\} matches no run"):
        load_matrix(path)


def test_device_auto_and_the_memory_bound_are_decided_where_the_runs_execute(tmp_path, monkeypatch):
    """``device: auto`` resolves on the machine that runs it, and a cluster's nodes have their own
    memory: the driver (a CPU-only Ray head) must not refuse what the nodes can run, and the
    node that cannot gets a ``skipped`` row that says why."""
    import torch

    from bench.runner.execute import execute

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "m.yaml"
    path.write_text(OK + "settings: {backend: int8, device: auto}")
    run = next(r for r in load_matrix(path).runs if not r.is_fp)  # loads: a GPU node can run it
    [row] = [r for r in execute(run, "m") if r["metric"] == run.metrics[0]]
    assert row["status"] == "skipped"
    assert "backend int8 runs on a CUDA GPU, not on device 'cpu' (device 'auto' is cpu" in row["error"]
    # A backend that fails on every device is still refused at load.
    path.write_text(OK.replace("W4A8", "W4A32") + "settings: {backend: x86, device: auto}")
    with pytest.raises(MatrixError, match="x86 needs quantized activations"):
        load_matrix(path)

    huge = OK + "settings: {samples: 1000000000000, device: cpu}"
    path.write_text(huge)
    with pytest.raises(MatrixError, match="need at least"):  # runs here: this machine bounds it
        load_matrix(path)
    on_cluster = load_matrix(path, "ray")  # --executor ray
    path.write_text(huge.replace("{", "{executor: ray, "))
    for matrix in (on_cluster, load_matrix(path)):
        fp = next(r for r in matrix.runs if r.is_fp)
        [row, *_] = execute(fp, "m")
        assert row["status"] == "skipped" and "need at least" in row["error"]


def test_every_shipped_matrix_expands_to_the_runs_its_committed_rows_came_from():
    """A run's identity (its hash) is what pairs, caches and resumes it: a change to how a spec
    hashes would orphan every committed row. Each matrix with committed results expands to
    exactly the runs those rows record (regenerate them at the commit that changes a matrix)."""
    import json

    checked = 0
    for config in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        matrix = load_matrix(config)
        runs = REPO_ROOT / "results" / matrix.name / "runs"
        if not runs.is_dir():
            continue
        committed = {json.loads(line)["config_hash"] for f in runs.glob("*.jsonl") for line in f.open()}
        assert {r.hash for r in matrix.expand()} == committed, config.name
        checked += 1
    assert checked >= 10  # the default, baselines, ablations, cost and Ray matrices at least
