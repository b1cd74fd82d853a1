"""wsi-il: interactive, expert-in-the-loop annotation of whole slide images, QuPath-compatible."""

__version__ = "0.1.0"
