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
