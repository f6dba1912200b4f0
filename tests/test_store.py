"""The results store: atomic per-run files, pandas in one call, corrupt files named."""

import json

import pandas as pd
import pytest

from bench.errors import StoreError
from bench.store import COLUMNS, ResultStore, load


def row(config_hash="h1", metric="m", value=1.0, status="ok", started="2026-01-01T00:00:00", run_id="r1"):
    return {**dict.fromkeys(COLUMNS), "config_hash": config_hash, "metric": metric, "value": value,
            "status": status, "started_at": started, "run_id": run_id, "matrix": "x",
            "model": "embedded-digits", "method": "fp", "bits": "FP"}  # fmt: skip


def test_append_is_one_new_file_per_run_and_loads_as_dataframe(tmp_path):
    store = ResultStore(tmp_path / "x")
    store.append([row(metric="a"), row(metric="b", value=2.0)])
    store.append([row(metric="a", value=3.0, started="2026-01-02T00:00:00", run_id="r2")])
    assert len(list(store.runs.glob("*.jsonl"))) == 2
    df = load(tmp_path / "x")
    assert isinstance(df, pd.DataFrame) and list(df.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert dict(zip(df["metric"], df["value"], strict=True)) == {"a": 3.0, "b": 2.0}  # latest per metric
    assert len(load(tmp_path / "x", latest=False)) == 3
    assert store.completed() == {"h1": {"a", "b"}}


def test_errors_are_not_completed_and_a_leftover_temp_file_is_ignored(tmp_path):
    store = ResultStore(tmp_path)
    store.append([row(status="error")])
    (store.runs / ".abc.tmp").write_text('{"half a row')  # what a kill mid-write leaves
    assert store.completed() == {} and len(store.rows()) == 1


def test_rows_must_have_the_schema_and_nan_is_refused(tmp_path):
    store = ResultStore(tmp_path)
    with pytest.raises(ValueError, match="lack schema columns"):
        store.append([{"config_hash": "h"}])
    with pytest.raises(ValueError):
        store.append([row(value=float("nan"))])
    assert not list(store.runs.glob("*.jsonl"))


def test_corrupt_file_is_one_clear_error(tmp_path):
    store = ResultStore(tmp_path)
    store.append([row()])
    bad = store.runs / "h2-r9.jsonl"
    bad.write_text(json.dumps(row()) + "\n{not json\n")
    with pytest.raises(StoreError, match=r"h2-r9.jsonl:2: corrupt results row .* move that file out"):
        store.rows()


def test_unwritable_path_and_missing_results_are_clear(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match=r"is not writable .* pass another with --results"):
        ResultStore(blocker / "m").check_writable()
    with pytest.raises(StoreError, match="no results at"):
        load(tmp_path / "nothing")


def test_cache_keys_follow_every_source_file_of_the_packages(tmp_path, monkeypatch):
    import importlib

    from bench.provenance import packages_hash

    package = tmp_path / "fakepkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    before = packages_hash(("fakepkg",))
    (package / "sub" / "new_algorithm.py").write_text("X = 1\n")  # a file no list names
    added = packages_hash(("fakepkg",))
    (package / "sub" / "new_algorithm.py").write_text("X = 2\n")
    assert len({before, added, packages_hash(("fakepkg",))}) == 3


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"value": float("inf")}, "an ok row's value must be a finite number, got inf"),
        ({"value": float("nan")}, "an ok row's value must be a finite number, got nan"),
        ({"value": "abc"}, "value must be a number or null, got 'abc'"),
        ({"method": 3}, "method must be text, got 3"),
        ({"started_at": None}, "started_at must be text, got None"),
        ({"started_at": "yesterday"}, "started_at 'yesterday' is not an ISO timestamp"),
        ({"started_at": "2999-01-01T00:00:00"}, "lies in the future (a skewed clock?)"),
    ],
)
def test_a_forged_row_is_refused_with_its_place_and_reason(tmp_path, change, reason):
    """Rows edited by hand or by an attacker: a value of Infinity must not rank first, a row
    dated in 2999 must not shadow every rerun, a label that is not text must not crash a
    report. Each is one line naming the file, the line and what is wrong."""
    store = ResultStore(tmp_path / "x")
    path = store.append([row(metric="a")])
    good = json.loads(path.read_text())
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, **change}) + "\n")
    with pytest.raises(StoreError) as info:
        load(tmp_path / "x")
    assert f"{path}:2: corrupt results row (" in str(info.value) and reason in str(info.value)
    assert "\n" not in str(info.value)


def test_a_row_of_another_matrix_is_refused_not_read_as_this_ones(tmp_path):
    """Rows copied in from another matrix, with higher values and later dates, must not replace
    this matrix's cells or retitle its report: the store holds the matrix its folder names."""
    store = ResultStore(tmp_path / "x")
    store.append([row(metric="a")])
    intruder = store.append([{**row(metric="a", value=99.0, started="2026-02-01T00:00:00", run_id="r2"),
                              "matrix": "other"}])  # fmt: skip
    with pytest.raises(StoreError) as info:
        load(tmp_path / "x")
    message = str(info.value)
    assert f"{intruder}:1: results row of matrix 'other' in the store of matrix 'x'" in message
    assert "move that file out" in message and "\n" not in message


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", "Expecting property name"),
        ("[1, 2]", "expected a JSON object, got list"),
        (json.dumps({"matrix": "x", "started_at": "2026-01-01T00:00:00"}), "field(s) wall_s, runs"),
        (b"\xff\xfe", "codec can't decode"),
    ],
)
def test_a_corrupt_invocation_record_is_one_clear_error(tmp_path, text, reason):
    store = ResultStore(tmp_path / "x")
    store.append([row()])
    path = store.root / "invocations" / "2026-01-01T000000.json"
    path.parent.mkdir()
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(StoreError) as info:
        store.invocations()
    assert f"{path}: corrupt invocation record (" in str(info.value) and reason in str(info.value)
    assert "move that file out" in str(info.value) and "\n" not in str(info.value)
