import subprocess

import pytest

from bench import provenance


@pytest.fixture
def repo(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "rows.jsonl").write_text("{}\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)
    provenance.git_sha.cache_clear()
    yield tmp_path
    provenance.git_sha.cache_clear()


def test_appended_results_do_not_mark_the_code_dirty(repo):
    (repo / "results" / "rows.jsonl").write_text("{}\n{}\n")
    sha = provenance.git_sha()
    assert len(sha) == 40 and not sha.endswith("+dirty")


def test_changed_code_is_marked_dirty(repo):
    (repo / "code.py").write_text("x = 2\n")
    assert provenance.git_sha().endswith("+dirty")


def test_code_that_only_plans_or_presents_runs_is_outside_the_cache_key(tmp_path, monkeypatch):
    import importlib

    package = tmp_path / "fakepkg"
    (package / "report").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model.py").write_text("W = 1\n")
    (package / "report" / "html.py").write_text("CSS = 'a'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    exclude = ("fakepkg/report/",)
    before = provenance.packages_hash(("fakepkg",), exclude)
    (package / "report" / "html.py").write_text("CSS = 'b'\n")  # a CSS edit keeps the cache
    assert provenance.packages_hash(("fakepkg",), exclude) == before
    (package / "model.py").write_text("W = 2\n")  # what makes an artefact does not
    assert provenance.packages_hash(("fakepkg",), exclude) != before


def test_the_code_outside_the_cache_key_is_never_what_an_artefact_is_made_with():
    """Every entry of NOT_IN_ARTEFACTS exists, and no hashed module of bench/ imports one, but
    for the progress display: otherwise a change there could change a cached artefact unseen."""
    from test_architecture import ROOT, graph

    def excluded(module: str) -> bool:
        rel = module.replace(".", "/")
        named = set(provenance.NOT_IN_ARTEFACTS)
        folders = [e for e in named if e.endswith("/")]
        in_folder = any(f"{rel}/".startswith(e) for e in folders)
        return in_folder or bool({f"{rel}.py", f"{rel}/__init__.py"} & named)

    for entry in provenance.NOT_IN_ARTEFACTS:
        assert (ROOT / entry).exists(), f"NOT_IN_ARTEFACTS names {entry}, which does not exist"
    display_only = {"bench.progress"}
    leaks = [
        f"{src} imports {dst}"
        for src, targets in graph().items()
        if src.startswith("bench") and not excluded(src)
        for dst in targets
        if excluded(dst) and dst not in display_only
    ]
    assert not leaks, "hashed code depends on code outside the cache key:\n" + "\n".join(sorted(leaks))
    assert excluded("bench.report.html") and excluded("bench.cli") and not excluded("bench.runner.execute")
