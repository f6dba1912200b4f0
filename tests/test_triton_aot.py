"""Every tile and mode the Triton backends can choose compiles for real GPUs (sm_80, sm_89,
sm_90), checked ahead of time on this CPU machine with Triton's own compiler and ``ptxas``.

The interpreter tests (``TRITON_INTERPRET=1``) run the kernels' arithmetic but not the GPU
compiler's rules: int8 ``tl.dot`` with 16-wide K tiles ran interpreted and failed to compile for
every GPU, which only a first GPU run would have shown.
"""

import itertools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton backends need triton (it comes with CUDA torch)")
kernels = pytest.importorskip("qdiff.backends.triton_kernels")

SHAPES = [2**i for i in range(14)]  # 1 … 8192: every size class of M, N and K


def tiles() -> set[tuple[int, int, int]]:
    """Every tile ``block_sizes`` returns, found by asking it."""
    return {kernels.block_sizes(m, o, k) for m, o, k in itertools.product(SHAPES, repeat=3)}


def _compile(job) -> str | None:
    target, mode, dtype, tile = job
    try:
        kernels.compile_for(target, mode, dtype, tile)
    except Exception as exc:  # the compiler's message, reported with the job that failed
        return f"{target} {mode} {dtype} tile {tile}: {type(exc).__name__}: {str(exc).splitlines()[-1]}"
    return None


def test_block_sizes_covers_the_documented_tiles():
    assert tiles() == set(itertools.product(kernels.TILE_MN, kernels.TILE_MN, kernels.TILE_K))
    assert min(kernels.TILE_K) >= 32  # int8 tl.dot's minimum K on NVIDIA GPUs


def test_every_tile_and_mode_compiles_for_every_target(monkeypatch):
    # Every tile in float16 (the GPU matrices' dtype); the activation dtype changes only loads,
    # stores and w4a16's dot operand, so bfloat16 and float32 are compiled at the largest tile.
    jobs = [
        (target, mode, torch.float16, tile)
        for target in kernels.TARGETS
        for mode in kernels.MODES
        for tile in sorted(tiles())
    ]
    largest = max(tiles())
    jobs += [
        (target, mode, dtype, largest)
        for target in kernels.TARGETS
        for mode in kernels.MODES
        for dtype in (torch.bfloat16, torch.float32)
    ]
    # Fresh processes without the interpreter the other tests run under (read at import).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # The check can fail: a 16-wide int8 K tile (which the interpreter runs) is refused.
    refused = ("sm_90", "int8", torch.float16, (32, 32, 16))
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        failures = list(pool.map(_compile, [refused, *jobs]))
    assert failures[0] is not None and "K >= 32" in failures[0]
    failures = [f for f in failures[1:] if f is not None]
    assert not failures, "\n".join(failures)
