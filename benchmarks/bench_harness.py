"""The harness's own overhead: expanding matrices, loading stores, building reports."""

from __future__ import annotations

from bench.matrix import load_matrix
from bench.provenance import REPO_ROOT


class Harness:
    timeout = 300

    def time_expand_paper_matrix(self):
        load_matrix(REPO_ROOT / "configs" / "paper-cifar10.yaml").expand()

    def time_load_default_results(self):
        from bench.store import load

        load(REPO_ROOT / "results" / "default")

    def time_build_default_report(self):
        from bench import report

        report.build(REPO_ROOT / "results" / "default")
