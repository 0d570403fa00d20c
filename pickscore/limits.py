"""Limits on one input that every path enforces alike, here so that parsers and clients read them without loading
the image decoder."""

DEFAULT_MAX_PIXELS = 8192 * 8192  # decoded pixels of one image (width x height), checked from its header
