"""Triton Python backend: PROMPT, IMAGE (BYTES) -> input_ids, pixel_values, with the pickscore package's own
tokenizer and preprocessing (so Triton scores exactly as `pickscore serve`). Needs `pip install pickscore`
in Triton's Python environment; the settings files sit beside this file."""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from pickscore.model.preprocess import PreprocessConfig, load_pixels
from pickscore.model.tokenizer import Tokenizer

HERE = Path(__file__).resolve().parent


class TritonPythonModel:
    def __init__(self):  # Triton constructs the model, then calls initialize with the model's config
        self.preprocess: PreprocessConfig | None = None
        self.tokenizer: Tokenizer | None = None

    def initialize(self, args):
        settings = json.loads((HERE / "pickscore_preprocess.json").read_text())
        self.preprocess = PreprocessConfig.from_hf(settings["preprocessor_config"])
        self.tokenizer = Tokenizer(context_length=settings["context_length"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                prompts = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy().reshape(-1)
                images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
                if len(prompts) == 1:
                    prompts = np.repeat(prompts, len(images))
                tokens = self.tokenizer([p.decode("utf-8") for p in prompts])
                pixels = np.stack([load_pixels(bytes(b), self.preprocess) for b in images])
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor("input_ids", tokens), pb_utils.Tensor("pixel_values", pixels)]
                    )
                )
            except Exception as e:  # a bad image fails its request, not the model
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
        return responses
