"""Every launch configuration and mode the Triton backends can choose compiles for real GPUs (sm_80, sm_89,
sm_90), checked ahead of time on this CPU machine with Triton's own compiler and ``ptxas``.

The interpreter tests (``TRITON_INTERPRET=1``) run the kernels' arithmetic but not the GPU
compiler's rules: int8 ``tl.dot`` with 16-wide K tiles ran interpreted and failed to compile for
every GPU, which only a first GPU run would have shown.
"""

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton backends need triton (it comes with CUDA torch)")
kernels = pytest.importorskip("qdiff.backends.triton_kernels")


def _compile(job) -> str | None:
    target, mode, dtype, config, taps = job
    try:
        kernels.compile_for(target, mode, dtype, config, taps)
    except Exception as exc:  # the compiler's message, reported with the job that failed
        return (
            f"{target} {mode} {dtype} {config} taps {taps}: {type(exc).__name__}: {str(exc).splitlines()[-1]}"
        )
    return None


def test_the_configurations_are_wgmma_eligible():
    # Hopper's wgmma takes int8/fp16 dots only with BLOCK_M a multiple of 64, warps a multiple
    # of 4 and K tiles of at least 32 (int8's minimum on every NVIDIA GPU).
    for config in kernels.CONFIGS:
        assert config.block_m % 64 == 0 and config.num_warps % 4 == 0 and config.block_k >= 32, config
    assert (
        kernels.default_config(8, 8) in kernels.CONFIGS
        and kernels.default_config(4096, 320) in kernels.CONFIGS
    )


def test_every_configuration_and_mode_compiles_for_every_target(monkeypatch):
    # Every configuration in both modes for Hopper (sm_90, where wgmma's rules on tiles and
    # warps apply), in float16, the GPU matrices' dtype, as a 1×1 kernel; for sm_80 and sm_89
    # the smallest and the largest configuration, which bound the others' tiles. The tap loop
    # is unrolled, so a 3×3 kernel is the same body 9 times at 5× the compile time: once per
    # mode. bfloat16 and float32 (which change only loads, stores and w4a16's dot operand) at
    # the largest configuration.
    smallest, largest = kernels.CONFIGS[0], kernels.CONFIGS[-1]
    jobs = [
        ("sm_90", mode, torch.float16, config, (1, 1)) for mode in kernels.MODES for config in kernels.CONFIGS
    ]
    jobs += [
        (target, mode, torch.float16, config, (1, 1))
        for target in ("sm_80", "sm_89")
        for mode in kernels.MODES
        for config in (smallest, largest)
    ]
    jobs += [("sm_90", mode, torch.float16, largest, (3, 3)) for mode in kernels.MODES]
    jobs += [
        ("sm_90", mode, dtype, largest, (1, 1))
        for mode in kernels.MODES
        for dtype in (torch.bfloat16, torch.float32)
    ]
    assert set(kernels.TARGETS) == {"sm_80", "sm_89", "sm_90"}
    # Fresh processes without the interpreter the other tests run under (read at import).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # The check can fail: a 16-wide int8 K tile (which the interpreter runs) is refused.
    refused = ("sm_90", "int8", torch.float16, kernels.KernelConfig(64, 64, 16, 4, 3), (1, 1))
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        failures = list(pool.map(_compile, [refused, *jobs]))
    assert failures[0] is not None and "K >= 32" in failures[0]
    failures = [f for f in failures[1:] if f is not None]
    assert not failures, "\n".join(failures)
