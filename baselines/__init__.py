"""Baseline PTQ methods, one file each, registered in ``bench.registry.METHODS``."""
