"""Prompt sets for text-to-image models: an evaluation set and a disjoint calibration set.

A text-to-image matrix samples its quality images from the *evaluation* prompts and records its
calibration trajectories from the *calibration* prompts only, so that no method can fit the
prompts it is scored on. Shipped (both from PartiPrompts, Apache-2.0, split by a hash of the
prompt; each file's header names its source, licence and SHA-256): ``parti-evaluation`` and
``parti-calibration``. A user's set is a UTF-8 text file, one prompt per line; lines starting
with ``#`` before the first prompt are its header.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

BUILTIN = {"parti-evaluation": "parti-evaluation.txt", "parti-calibration": "parti-calibration.txt"}
DEFAULT = {"evaluation": "parti-evaluation", "calibration": "parti-calibration"}


@dataclass(frozen=True)
class PromptSet:
    name: str  # a shipped set's name, or the file's path
    prompts: tuple[str, ...]

    @cached_property  # read by every cache key and row of a run
    def sha256(self) -> str:
        """Of the prompts, UTF-8, joined by newlines: what a shipped file's header states."""
        return hashlib.sha256("\n".join(self.prompts).encode("utf-8")).hexdigest()

    def record(self) -> dict[str, object]:
        """What a results row records of this set."""
        return {"name": self.name, "sha256": self.sha256, "prompts": len(self.prompts)}

    def take(self, start: int, n: int) -> list[str]:
        """The prompts of samples ``start..start+n``: sample ``i`` uses prompt ``i mod len``."""
        return [self.prompts[i % len(self.prompts)] for i in range(start, start + n)]


def parse(text: str, name: str) -> PromptSet:
    """A prompt set from a file's text: its leading ``#`` lines are the header, then one prompt
    per non-empty line."""
    lines = [line.strip() for line in text.splitlines()]
    body = iter(lines)
    prompts = []
    for line in body:
        if line and not line.startswith("#"):
            prompts.append(line)
            break
    prompts.extend(line for line in body if line)
    if not prompts:
        raise ValueError(f"prompts file {name} has no prompts (one per line)")
    return PromptSet(name, tuple(prompts))


def load(source: str) -> PromptSet:
    """A shipped set by name, or a text file by path."""
    if source in BUILTIN:
        return parse(resources.files(__name__).joinpath(BUILTIN[source]).read_text("utf-8"), source)
    try:
        text = Path(source).expanduser().read_text("utf-8")
    except OSError as exc:
        raise ValueError(
            f"cannot read prompts file {source}: {exc.strerror}; give a UTF-8 text file (one prompt "
            f"per line) or a shipped set: {', '.join(BUILTIN)}"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"prompts file {source} is not UTF-8 text") from None
    return parse(text, source)


def source_problem(source: str) -> str | None:
    """Why ``source`` names no prompt set here (for ``validate``), or None."""
    if source in BUILTIN or Path(str(source)).expanduser().is_file():
        return None
    return f"{source}: no such file here and no shipped set (shipped: {', '.join(BUILTIN)})"


def overlap(calibration: PromptSet, evaluation: PromptSet) -> list[str]:
    """The calibration prompts that are also evaluation prompts (compared case- and
    space-insensitively)."""
    key = lambda p: " ".join(p.lower().split())  # noqa: E731
    seen = {key(p) for p in evaluation.prompts}
    return [p for p in calibration.prompts if key(p) in seen]
