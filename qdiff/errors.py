"""The root of every error qdiff and the harness raise on purpose.

Each such error names the problem and the fix in its message, so a caller (the command line,
``bench.cli``) prints it as one line instead of a traceback by catching this one class.
"""

from __future__ import annotations


class QdiffError(Exception):
    """An error raised on purpose, with a message that names the problem and the fix."""
