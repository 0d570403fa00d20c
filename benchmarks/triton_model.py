"""What a user deploys on Triton instead of `pickscore serve`: the model card's code in a Python-backend model.

Copied as ``model.py`` into a Triton model repository by ``triton_deploy.write_repository`` (config: dynamic
batching, one CPU instance); Triton's Python backend runs it in its stub process. Each request is one prompt
(repeated on the batch axis, which every input of a batched model shares) and its images (encoded bytes);
the answer is each image's score. One ``execute`` gets every request the dynamic batcher gathered: their
images are decoded with PIL and preprocessed by ``CLIPProcessor`` on a thread pool, encoded by
``transformers.CLIPModel`` in one forward pass, their prompts in another, and scored as the model card does:
``logit_scale.exp() * text_emb @ image_emb.T`` on L2-normalised embeddings.

Parameters (config.pbtxt ``parameters``): ``model_dir`` (a Hugging Face CLIP directory), ``torch_threads``,
``decode_threads``.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class TritonPythonModel:
    def initialize(self, args):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        torch.set_num_threads(int(params.get("torch_threads", "2")))
        self.torch = torch
        self.processor = CLIPProcessor.from_pretrained(params["model_dir"])
        self.model = CLIPModel.from_pretrained(params["model_dir"]).eval()
        self.pool = ThreadPoolExecutor(int(params.get("decode_threads", "2")))

    def _pixels(self, blob: bytes) -> np.ndarray:
        from PIL import Image

        image = Image.open(io.BytesIO(blob))
        return self.processor(images=image, return_tensors="np")["pixel_values"][0]

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        torch = self.torch
        prompts, blobs, counts = [], [], []
        for request in requests:
            prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy().reshape(-1)[0]
            images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
            prompts.append(prompt.decode() if isinstance(prompt, bytes) else str(prompt))
            blobs.extend(bytes(b) for b in images)
            counts.append(len(images))
        pixels = torch.from_numpy(np.stack(list(self.pool.map(self._pixels, blobs))))
        text = self.processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.inference_mode():
            img = self.model.get_image_features(pixel_values=pixels)
            img = getattr(img, "pooler_output", img)
            img = img / img.norm(dim=-1, keepdim=True)
            txt = self.model.get_text_features(**text)
            txt = getattr(txt, "pooler_output", txt)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            scale = self.model.logit_scale.exp()
        responses, start = [], 0
        for r, n in enumerate(counts):
            scores = (scale * img[start : start + n] @ txt[r]).float().numpy().reshape(n, 1)
            start += n
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("SCORE", scores.astype(np.float32))]))
        return responses

    def finalize(self):
        self.pool.shutdown()
