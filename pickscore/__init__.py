"""PickScore: score text-to-image generations by predicted human preference.

    from pickscore import Scorer
    Scorer.from_pretrained("demo").rank("two red circles on the left, blue background", ["a.png", "b.png"])

The facade: modules inside the package import from their own layer's modules, never from here.
"""

from pickscore.errors import InvalidInput, ModelLoadError, PickScoreError
from pickscore.extras import missing_extra
from pickscore.version import __version__

__all__ = ["InvalidInput", "ModelLoadError", "PickScoreError", "Ranking", "Scorer", "__version__"]


def __getattr__(name):  # torch loads only when the scorer is used
    try:
        if name == "Scorer":
            from pickscore.scorer import Scorer

            return Scorer
        if name == "Ranking":
            from pickscore.model.scoring import Ranking

            return Ranking
    except ModuleNotFoundError as e:  # a client-only install: say which extra brings the scorer
        message = missing_extra(e)
        if message is None:
            raise
        raise ModuleNotFoundError(f"pickscore.{name}: {message}", name=e.name) from e
    raise AttributeError(f"module 'pickscore' has no attribute {name!r}")
