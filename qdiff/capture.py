"""A unit's inputs or outputs inside a model, captured over calibration data by hooks that stop the
forward once the unit has run (what reconstruction trains on)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from qdiff.calibration import CalibData, run_model
from qdiff.hooks import installed


class Stop(Exception):
    """Raised by a capture hook once the unit has run: the rest of the forward is not needed."""


class Captured:
    """A unit's call arguments over all calibration batches, indexable along the batch."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict]] = []
        self.batch_sizes: list[int] = []

    def add(self, args: tuple, kwargs: dict, batch_size: int) -> None:
        detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
        self.calls.append((tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()}))
        self.batch_sizes.append(batch_size)

    def merge(self) -> None:
        """Concatenate batched tensors; anything else must be the same in every batch."""

        def merge_one(values: list):
            first = values[0]
            batched = all(
                isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n
                for v, n in zip(values, self.batch_sizes, strict=True)
            )
            if batched:
                return ("batched", torch.cat(values))
            return ("static", first)

        args0, kwargs0 = self.calls[0]
        self.args = [merge_one([c[0][i] for c in self.calls]) for i in range(len(args0))]
        self.kwargs = {k: merge_one([c[1][k] for c in self.calls]) for k in kwargs0}
        self.calls = []

    def get(self, index: torch.Tensor) -> tuple[list, dict]:
        pick = lambda kv: kv[1][index] if kv[0] == "batched" else kv[1]  # noqa: E731
        return [pick(a) for a in self.args], {k: pick(v) for k, v in self.kwargs.items()}


@torch.no_grad()
def capture(model: nn.Module, unit: nn.Module, data: CalibData, batch_size: int, what: str):
    """Run the model on the calibration data and keep the unit's inputs or outputs."""
    store = Captured()
    outputs: list[torch.Tensor] = []
    current = {"n": 0}

    def pre_hook(_mod, args, kwargs):
        store.add(args, kwargs, current["n"])
        raise Stop

    def hook(_mod, _args, _kwargs, output):
        outputs.append(as_tensor(output).detach())
        raise Stop

    handle = (
        unit.register_forward_pre_hook(pre_hook, with_kwargs=True)
        if what == "inputs"
        else unit.register_forward_hook(hook, with_kwargs=True)
    )
    with installed([handle]):
        for batch in data.batches(batch_size):
            current["n"] = len(batch[0])
            with contextlib.suppress(Stop):
                run_model(model, batch)
    if what == "inputs":
        store.merge()
        return store
    return torch.cat(outputs)


def as_tensor(output) -> torch.Tensor:
    if hasattr(output, "sample"):  # a diffusers model output
        return output.sample
    if isinstance(output, tuple):
        # Dual-stream transformer blocks (SD3, FLUX) return (text, image) tokens: the unit's
        # output is both, flattened per sample (the last joint block's text output is None).
        parts = [t for t in output if isinstance(t, torch.Tensor)]
        return parts[0] if len(parts) == 1 else torch.cat([t.flatten(1) for t in parts], 1)
    return output
