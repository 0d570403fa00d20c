"""The Triton model configurations of the three models, shared by the Triton export and the KServe v2 service.

Both sides describe the same tensors: the server's KServe v2 models answer with these configs, and
``pickscore export triton`` writes them as config.pbtxt files (plus its two Python-backend steps).

    configs = model_configs(embed_dim=1024, image_size=(224, 224), context_length=77,
                            max_batch_size=32, max_images_per_request=256, max_queue_delay_us=5000)
    configs["pickscore"]        # ensemble: PROMPT (BYTES), IMAGE (BYTES) -> SCORE (FP32)
    configs["pickscore_image"]  # ONNX: pixel_values [B, 3, H, W] -> image_embeds [B, D]
    configs["pickscore_text"]   # ONNX: input_ids [B, 77] -> text_embeds [B, D]

Shapes leave out the batch axis, as Triton's ``dims`` do when ``max_batch_size`` > 0.
"""

from __future__ import annotations

from tritonclient.grpc import model_config_pb2 as mc

ENSEMBLE = "pickscore"
IMAGE = "pickscore_image"
TEXT = "pickscore_text"
PREPROCESS = "pickscore_preprocess"  # the ensemble's Python-backend steps (in our server, the engine does both):
SCORE = "pickscore_score"  # decoding, preprocessing and tokenizing; exp(logit_scale) * <text, image>


def tensor(cls, name: str, dtype: int, dims: list[int]):
    return cls(name=name, data_type=dtype, dims=dims)


def model_configs(
    embed_dim: int,
    image_size: tuple[int, int],
    context_length: int,
    max_batch_size: int,
    max_images_per_request: int,
    max_queue_delay_us: int,
    pixels: bool = False,
    name: str = ENSEMBLE,
) -> dict[str, mc.ModelConfig]:
    """The three models, ``name``, ``name``_image and ``name``_text (pickscore, pickscore_image, pickscore_text
    by default). ``pixels`` (this server, not a Triton repository): the ensemble also takes PIXELS, UINT8 [N, H, W,
    3] decoded images of one size, instead of IMAGE; both become optional, one is required."""
    image_name, text_name = tower_names(name)
    h, w = image_size
    batching = mc.ModelDynamicBatching(max_queue_delay_microseconds=max_queue_delay_us)
    image = _tower(
        image_name,
        tensor(mc.ModelInput, "pixel_values", mc.TYPE_FP32, [3, h, w]),
        tensor(mc.ModelOutput, "image_embeds", mc.TYPE_FP32, [embed_dim]),
        max_batch_size,
        batching,
    )
    text = _tower(
        text_name,
        tensor(mc.ModelInput, "input_ids", mc.TYPE_INT64, [context_length]),
        tensor(mc.ModelOutput, "text_embeds", mc.TYPE_FP32, [embed_dim]),
        max_batch_size,
        batching,
    )
    return {name: _ensemble(name, max_images_per_request, pixels), image_name: image, text_name: text}


def tower_names(name: str) -> tuple[str, str]:
    """The KServe names of a model's image and text towers."""
    return f"{name}_image", f"{name}_text"


def _tower(name: str, input, output, max_batch_size: int, batching) -> mc.ModelConfig:
    """One ONNX tower: one input, one output, batched dynamically."""
    return mc.ModelConfig(
        name=name,
        platform="onnxruntime_onnx",
        max_batch_size=max_batch_size,
        dynamic_batching=batching,
        input=[input],
        output=[output],
        instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_AUTO, count=1)],
    )


# The ensemble's steps: (model, its inputs from the ensemble's tensors, its outputs to the ensemble's tensors).
_ENSEMBLE_STEPS = [
    (PREPROCESS, {"PROMPT": "PROMPT", "IMAGE": "IMAGE"}, {"input_ids": "_input_ids", "pixel_values": "_pixel_values"}),
    (TEXT, {"input_ids": "_input_ids"}, {"text_embeds": "_text_embeds"}),
    (IMAGE, {"pixel_values": "_pixel_values"}, {"image_embeds": "_image_embeds"}),
    (SCORE, {"text_embeds": "_text_embeds", "image_embeds": "_image_embeds"}, {"SCORE": "SCORE"}),
]


def _ensemble(name: str, max_images_per_request: int, pixels: bool) -> mc.ModelConfig:
    """PROMPT and IMAGE (or PIXELS) -> SCORE: preprocessing, the text and image towers, then the score."""
    inputs = [
        tensor(mc.ModelInput, "PROMPT", mc.TYPE_STRING, [1]),
        mc.ModelInput(name="IMAGE", data_type=mc.TYPE_STRING, dims=[1], optional=pixels),
    ]
    if pixels:
        inputs.append(mc.ModelInput(name="PIXELS", data_type=mc.TYPE_UINT8, dims=[-1, -1, 3], optional=True))
    renamed = dict(zip((IMAGE, TEXT), tower_names(name)))
    steps = [
        mc.ModelEnsembling.Step(
            model_name=renamed.get(model, model), model_version=-1, input_map=inputs_of, output_map=outputs_of
        )
        for model, inputs_of, outputs_of in _ENSEMBLE_STEPS
    ]
    return mc.ModelConfig(
        name=name,
        platform="ensemble",
        max_batch_size=max_images_per_request,
        input=inputs,
        output=[tensor(mc.ModelOutput, "SCORE", mc.TYPE_FP32, [1])],
        ensemble_scheduling=mc.ModelEnsembling(step=steps),
    )


# KServe v2 datatype names of Triton's TYPE_* values.
DATATYPES = {
    mc.TYPE_FP32: "FP32",
    mc.TYPE_FP16: "FP16",
    mc.TYPE_INT64: "INT64",
    mc.TYPE_UINT8: "UINT8",
    mc.TYPE_STRING: "BYTES",
}
