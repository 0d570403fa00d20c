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
) -> dict[str, mc.ModelConfig]:
    """The three models. ``pixels`` (this server, not a Triton repository): ``pickscore`` also takes PIXELS,
    UINT8 [N, H, W, 3] decoded images of one size, instead of IMAGE; both become optional, one is required."""
    h, w = image_size
    batching = mc.ModelDynamicBatching(max_queue_delay_microseconds=max_queue_delay_us)
    image = mc.ModelConfig(
        name=IMAGE,
        platform="onnxruntime_onnx",
        max_batch_size=max_batch_size,
        dynamic_batching=batching,
        input=[tensor(mc.ModelInput, "pixel_values", mc.TYPE_FP32, [3, h, w])],
        output=[tensor(mc.ModelOutput, "image_embeds", mc.TYPE_FP32, [embed_dim])],
        instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_AUTO, count=1)],
    )
    text = mc.ModelConfig(
        name=TEXT,
        platform="onnxruntime_onnx",
        max_batch_size=max_batch_size,
        dynamic_batching=batching,
        input=[tensor(mc.ModelInput, "input_ids", mc.TYPE_INT64, [context_length])],
        output=[tensor(mc.ModelOutput, "text_embeds", mc.TYPE_FP32, [embed_dim])],
        instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_AUTO, count=1)],
    )
    Step = mc.ModelEnsembling.Step
    ensemble = mc.ModelConfig(
        name=ENSEMBLE,
        platform="ensemble",
        max_batch_size=max_images_per_request,
        input=[
            tensor(mc.ModelInput, "PROMPT", mc.TYPE_STRING, [1]),
            mc.ModelInput(name="IMAGE", data_type=mc.TYPE_STRING, dims=[1], optional=pixels),
        ]
        + ([mc.ModelInput(name="PIXELS", data_type=mc.TYPE_UINT8, dims=[-1, -1, 3], optional=True)] if pixels else []),
        output=[tensor(mc.ModelOutput, "SCORE", mc.TYPE_FP32, [1])],
        ensemble_scheduling=mc.ModelEnsembling(
            step=[
                Step(
                    model_name=PREPROCESS,
                    model_version=-1,
                    input_map={"PROMPT": "PROMPT", "IMAGE": "IMAGE"},
                    output_map={"input_ids": "_input_ids", "pixel_values": "_pixel_values"},
                ),
                Step(
                    model_name=TEXT,
                    model_version=-1,
                    input_map={"input_ids": "_input_ids"},
                    output_map={"text_embeds": "_text_embeds"},
                ),
                Step(
                    model_name=IMAGE,
                    model_version=-1,
                    input_map={"pixel_values": "_pixel_values"},
                    output_map={"image_embeds": "_image_embeds"},
                ),
                Step(
                    model_name=SCORE,
                    model_version=-1,
                    input_map={"text_embeds": "_text_embeds", "image_embeds": "_image_embeds"},
                    output_map={"SCORE": "SCORE"},
                ),
            ]
        ),
    )
    return {ENSEMBLE: ensemble, IMAGE: image, TEXT: text}


# KServe v2 datatype names of Triton's TYPE_* values.
DATATYPES = {
    mc.TYPE_FP32: "FP32",
    mc.TYPE_FP16: "FP16",
    mc.TYPE_INT64: "INT64",
    mc.TYPE_UINT8: "UINT8",
    mc.TYPE_STRING: "BYTES",
}
