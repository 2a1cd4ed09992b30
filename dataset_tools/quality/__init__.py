"""`loratrain dataset check`: per-image measurements, a registry of checks over them, and quarantine."""

from . import marks_check  # noqa: E402,F401  (registers the text_marks and video_marks checks)
