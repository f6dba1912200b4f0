"""asv benchmarks of qdiff-bench (configured by asv.conf.json at the repository root)."""
