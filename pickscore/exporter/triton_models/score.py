"""Triton Python backend: text_embeds, image_embeds (the towers' rows) -> SCORE = exp(logit_scale) * <text, image>."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def __init__(self):  # Triton constructs the model, then calls initialize with the model's config
        self.scale = np.float32(1.0)  # exp(logit_scale), read from the config by initialize

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.scale = np.float32(np.exp(float(config["parameters"]["logit_scale"]["string_value"])))

    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text_embeds").as_numpy()  # (N, D)
            image = pb_utils.get_input_tensor_by_name(request, "image_embeds").as_numpy()  # (N, D)
            score = (self.scale * np.einsum("nd,nd->n", text, image)).astype(np.float32)[:, None]  # (N, 1)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("SCORE", score)]))
        return responses
