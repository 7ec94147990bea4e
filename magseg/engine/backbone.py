"""Backbones as the engine sees them: any ``nn.Module`` mapping ``(B, C_in, h, w)`` to
``(B, classes, h, w)`` logits, or probabilities where it says so (the ``Backbone``
contract), and how to call one. Building them
from ``model.*`` is ``magseg.models`` (smp models by name: ``magseg.models.smp``; FCtL).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor


class Backbone(Protocol):
    """What the engine runs at every stage: images in, per-pixel class logits out.

    ``backbone(x)``: ``x`` is ``(B, C_in, h, w)`` (normalised image crops, ``C_in`` =
    ``model.in_channels``); returns ``(B, classes, h, w)`` logits at the same ``h, w``, or a
    tuple/list whose first item is those logits (smp models with an auxiliary head). Usually
    an ``nn.Module``: training updates it, prediction and the benchmark only call it.

    Optional attributes, read by ``context_ratios()`` and ``input_multiple()``:

    - ``context_ratios``: a multi-context backbone (``MultiContextBackbone``, e.g. FCtL) is
      called as ``backbone(x, contexts)``, ``contexts`` one ``(B, C_in, h, w)`` batch per
      ratio: the crop's surroundings, ``ratio`` times its extent around the same centre,
      at the crop's size (``magseg.engine.pyramid.context_windows``).
    - ``requires_divisible_input_shape`` (True) with ``encoder.output_stride``: ``h`` and
      ``w`` must be multiples of that stride; ``run_backbone`` pads the input and crops the
      logits back.
    - ``returns_probabilities`` (True): the output is already the class probabilities, the
      softmax of the logits (a runtime's graph that ends in it, ``RuntimeBackbone``); the
      engine then takes them as they are (``gives_probabilities``).
    """

    def __call__(self, x: Tensor, /, *contexts: list[Tensor]) -> Tensor | tuple[Tensor, ...]: ...


@runtime_checkable
class MultiContextBackbone(Backbone, Protocol):
    """A backbone that also sees each crop's surroundings: ``backbone(x, contexts)`` with
    one ``(B, C_in, h, w)`` batch per entry of ``context_ratios`` (FCtL)."""

    context_ratios: Sequence[float]


def context_ratios(backbone: Backbone) -> tuple[float, ...]:
    """Context extents a multi-context backbone (FCtL) wants beside each crop; () for others."""
    return tuple(backbone.context_ratios) if isinstance(backbone, MultiContextBackbone) else ()


def gives_probabilities(backbone: Backbone) -> bool:
    """Whether the backbone's output is its class probabilities rather than logits."""
    return getattr(backbone, "returns_probabilities", False) is True


def input_multiple(backbone: Backbone) -> int:
    """The factor the backbone's input height and width must be divisible by (1 if none)."""
    recorded = getattr(backbone, "input_multiple", None)  # a RuntimeBackbone knows its own
    if isinstance(recorded, int):
        return recorded
    if not getattr(backbone, "requires_divisible_input_shape", False):
        return 1
    return int(getattr(getattr(backbone, "encoder", None), "output_stride", 1))


def padded_input(x: Tensor, multiple: int) -> Tensor:
    """``x`` ``(..., h, w)`` padded at the bottom and right to the next multiple of
    ``multiple``: reflected, or replicated where the padding is as wide as the map (reflection
    cannot reach); ``x`` itself when it is a multiple already."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not (ph or pw):
        return x
    return F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")


def run_backbone(
    backbone: Backbone, x: Tensor, multiple: int = 1, contexts: list[Tensor] | None = None,
    channels_last: bool = False,
) -> Tensor:
    """Logits (or probabilities: ``gives_probabilities``) of ``x`` (B, C_in, h, w) ->
    ``(B, classes, h, w)``, reflect-padding the input to
    a multiple of ``multiple`` when the architecture needs it and cropping the output back.

    ``contexts``: for multi-context backbones (FCtL), one ``(B, C_in, h, w)`` batch per
    context ratio, padded the same way and passed as ``backbone(x, contexts)``.
    ``channels_last``: feed the inputs in NHWC, the layout of a backbone converted with
    ``.to(memory_format=torch.channels_last)`` (the engine's and training's option), unless
    the backbone says it takes NCHW (``takes_channels_last = False``: a runtime's graph).
    An input already of a multiple's size is not padded: ``magseg.engine.fused.shrink_planes``
    pads as it shrinks.
    """
    h, w = x.shape[-2:]
    x = padded_input(x, multiple)
    if contexts is not None:
        contexts = [padded_input(c, multiple) for c in contexts]
    if channels_last and getattr(backbone, "takes_channels_last", True):
        x = x.contiguous(memory_format=torch.channels_last)
        if contexts is not None:
            contexts = [c.contiguous(memory_format=torch.channels_last) for c in contexts]
    out = backbone(x) if contexts is None else backbone(x, contexts)
    if isinstance(out, (tuple, list)):  # smp models with an aux head return (masks, labels)
        out = out[0]
    return out[..., :h, :w]
