"""The qdiff-bench harness."""

# qdiff quiets torch's and diffusers' import-time warnings about torchao (see qdiff/__init__.py);
# the harness imports diffusers before it needs qdiff, so it imports qdiff first.
import qdiff  # noqa: F401
