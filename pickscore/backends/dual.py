"""The scoring rule of the dual-encoder kinds (PickScore and any CLIP, HPS v2, the aesthetic predictor), which both
backends share: the towers' rows meet in a dot product, times exp(logit_scale)."""

from __future__ import annotations

import numpy as np

from pickscore.model import scoring


class DualEncoder:
    """The scoring rule of a model whose towers' outputs meet in a dot product: exp(logit_scale) * <text, image>."""

    kind = "clip"
    joint = False
    logit_scale: float

    def scores(self, text: np.ndarray, images: np.ndarray) -> np.ndarray:
        if len(text) == 1:
            return scoring.scores(text[0], images, self.logit_scale)
        return scoring.paired_scores(text, images, self.logit_scale)
