"""Baseline PTQ methods, one file each. Each file registers its methods in
``bench.registry.METHODS`` (``METHOD = METHODS.add(...)``), which imports every module of this
package on its first lookup: a new file here is a new method."""
