"""PickScore: score text-to-image generations by predicted human preference."""

__version__ = "0.1.0"

from pickscore.errors import InvalidInput, ModelLoadError, PickScoreError  # noqa: E402

__all__ = ["InvalidInput", "ModelLoadError", "PickScoreError", "Scorer", "Ranking", "__version__"]


def __getattr__(name):  # import torch only when the scorer is used
    if name in ("Scorer", "Ranking"):
        from pickscore import scorer

        return getattr(scorer, name)
    raise AttributeError(f"module 'pickscore' has no attribute {name!r}")
