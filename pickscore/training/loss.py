"""The PickScore preference loss (Kirstain et al. 2023, "Pick-a-Pic"), over the global batch when distributed.

For a prompt x and its two images y0, y1 with scores s_j = exp(logit_scale) * <text(x), image(y_j)>:

    loss_i = CE(softmax([s0, s1]), [label_0, label_1])       labels (1, 0), (0, 1) or a tie (0.5, 0.5)
           + log(0.5) if the example is a tie                  the "tie offset" (``tie_offset=True``)
    loss   = sum_i w_i * loss_i / sum_i w_i                    w_i = 1 / num_example_per_prompt_i

This follows the original trainer (yuvalkirstain/PickScore, trainer/criterions/clip_criterion.py):

- The tie offset: a tie's cross-entropy against (0.5, 0.5) is at least log 2, reached when s0 == s1; adding
  log(0.5) makes the best achievable loss 0 for every label, i.e. the loss is the KL divergence from the label
  distribution to the predicted one, as the paper writes it. It is a constant per example: gradients are the
  same with or without it, only the reported value moves.
- The weights are normalised by their sum (not by the batch size), so the loss is a weighted mean: a prompt
  that appears k times in the data contributes like one example, and the value is on the per-example scale.
- Under torch.distributed every rank gathers the whole global batch and computes the same global loss; see
  ``gather_features`` for why the gradients then match one process on the global batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_features(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concatenate each (B, ...) tensor across ranks in rank order -> (world_size * B, ...); identity when alone.

    The gather is differentiable (``torch.distributed.nn.all_gather``): in backward each rank's gradient for the
    global batch is summed back into the shard that produced it. Every rank computes the same global loss L, so
    a rank's local gradient is world_size * dL/d(its shard); DDP (and FSDP) average gradients over ranks, which
    gives exactly dL/d(params) of one process on the global batch. Every rank must call this with the same B.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    from torch.distributed.nn.functional import all_gather

    return tuple(torch.cat(all_gather(t), dim=0) for t in tensors)


def pickscore_loss(
    text_embeds: torch.Tensor,
    image_0_embeds: torch.Tensor,
    image_1_embeds: torch.Tensor,
    label_0: torch.Tensor,
    label_1: torch.Tensor,
    logit_scale: torch.Tensor,
    num_example_per_prompt: torch.Tensor | None = None,
    in_batch_negatives: bool = False,
    tie_offset: bool = True,
) -> torch.Tensor:
    """The weighted preference loss of a (local) batch of B examples -> scalar tensor.

    text_embeds, image_0_embeds, image_1_embeds: (B, D), L2-normalised. label_0, label_1: (B,), summing to 1.
    logit_scale: scalar tensor, the log of the scale (the model's ``logit_scale`` parameter before ``exp``).
    num_example_per_prompt: (B,) how often each example's prompt occurs in the training data; None weighs all
    examples equally. tie_offset: add log(0.5) to ties (see the module docstring).

    in_batch_negatives (the paper's section 7 ablation, as the original implements it): the loss is the mean
    of two terms per example.
      text side:  the prompt's logits over all 2B images of the (global) batch, against the soft target that
                  puts label_0 on its own image 0, label_1 on its own image 1 and 0 on every other image, so
                  the preferred image has to beat every image in the batch, not only its pair partner.
      image side: each of its two images' logits over all B prompts, cross-entropy towards its own prompt,
                  weighted by that image's label.
    With B == 1 the image side is 0 (one prompt to choose from), so the loss is half the pairwise loss.
    """
    text_embeds, image_0_embeds, image_1_embeds, label_0, label_1 = gather_features(
        text_embeds, image_0_embeds, image_1_embeds, label_0, label_1
    )
    if num_example_per_prompt is not None:
        (num_example_per_prompt,) = gather_features(num_example_per_prompt)
    scale = logit_scale.exp()
    label_0, label_1 = label_0.to(text_embeds.dtype), label_1.to(text_embeds.dtype)
    B = text_embeds.shape[0]

    if in_batch_negatives:
        images = torch.cat([image_0_embeds, image_1_embeds], dim=0)  # (2B, D): all image 0s, then all image 1s
        logits = scale * text_embeds @ images.T  # (B, 2B)
        own = torch.arange(B, device=logits.device)
        target = torch.zeros_like(logits)  # (B, 2B)
        target[own, own] = label_0
        target[own, own + B] = label_1
        text_loss = F.cross_entropy(logits, target, reduction="none")  # (B,)
        image_loss = F.cross_entropy(logits.T, torch.cat([own, own]), reduction="none")  # (2B,)
        image_loss = label_0 * image_loss[:B] + label_1 * image_loss[B:]  # (B,)
    else:
        s0 = scale * (text_embeds * image_0_embeds).sum(dim=-1)  # (B,)
        s1 = scale * (text_embeds * image_1_embeds).sum(dim=-1)  # (B,)
        text_loss = F.cross_entropy(
            torch.stack([s0, s1], dim=-1), torch.stack([label_0, label_1], dim=-1), reduction="none"
        )

    if tie_offset:
        text_loss = text_loss + math.log(0.5) * (label_0 == label_1).to(text_loss.dtype)
    loss = (text_loss + image_loss) / 2 if in_batch_negatives else text_loss  # (B,)

    weights = torch.ones_like(loss) if num_example_per_prompt is None else 1.0 / num_example_per_prompt.to(loss.dtype)
    return (weights * loss).sum() / weights.sum()
