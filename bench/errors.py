"""Every error the harness raises on purpose, in one place.

Each names the problem and the fix in its message; the command line prints that one line
(``bench.cli``) instead of a traceback, catching their common root
:class:`qdiff.errors.QdiffError` (qdiff's own ``ConfigError`` and ``BackendError`` derive from it
too). ``AvailabilityError`` is special: it is not a mistake but this machine lacking something
(weights offline, no CUDA), and the run's rows become ``skipped`` instead of ``error``.
"""

from __future__ import annotations

from qdiff.errors import QdiffError
from qdiff.registry import UnknownNameError

__all__ = ["UnknownNameError"]  # raised by every registry; defined beside it in qdiff


class AvailabilityError(QdiffError, RuntimeError):
    """The run cannot happen on this machine (weights absent offline, no CUDA): a skipped row."""


class BitsError(QdiffError, ValueError):
    """A bit-width label that cannot be parsed or is out of range."""


class MatrixError(QdiffError, ValueError):
    """A matrix file that cannot be expanded; the message names the file and the fix."""


class StoreError(QdiffError, ValueError):
    """The results path cannot be written, or a results file is not valid."""


class ImageError(QdiffError, ValueError):
    """Images or an image folder that cannot be measured; the message says what is expected."""


class AssetError(QdiffError, RuntimeError):
    """A committed checkpoint is missing or unreadable."""


class ThresholdError(QdiffError, ValueError):
    """A threshold that is neither a number nor a percentage."""


class IncomparableError(QdiffError, ValueError):
    """Two results folders whose cells cannot be compared."""


class ClusterError(QdiffError, RuntimeError):
    """The Ray executor cannot start: Ray is not installed, or the cluster cannot be reached."""
