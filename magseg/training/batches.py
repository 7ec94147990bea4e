"""What the training samples hold, one item and one batch per phase.

The loader's collate functions stack items into batches; the losses read the batches' fields.
Each optional field is None where the phase's setup does not make it (a single-context
backbone has no contexts; a refiner phase with cached coarse maps has no ``scene0``), never a
missing key. ``pin_memory`` is what a DataLoader with ``pin_memory=True`` calls on a batch of
a type it does not know: the batch comes back page-locked, for ``non_blocking`` copies.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor


def _pinned(value):
    if isinstance(value, Tensor):
        return value.pin_memory()
    if isinstance(value, list):
        return [_pinned(v) for v in value]
    return value


class _Pinnable:
    def pin_memory(self):
        return dataclasses.replace(self, **{f.name: _pinned(getattr(self, f.name))  # type: ignore[arg-type]
                                            for f in dataclasses.fields(self)})  # type: ignore[arg-type]


@dataclass
class BackboneItem:
    """A backbone-phase sample: a window at one stage's magnification, resized to the input
    and augmented. ``image`` ``(C_in, ih, iw)`` float32; ``mask`` ``(ih, iw)`` int64;
    ``contexts`` ``(ratios, C_in, ih, iw)`` for a multi-context backbone (augmented alike)."""

    image: Tensor
    mask: Tensor
    contexts: Tensor | None = None


@dataclass
class BackboneBatch(_Pinnable):
    """``BackboneItem``s stacked: ``image`` ``(B, C_in, ih, iw)``, ``mask`` ``(B, ih, iw)``,
    ``contexts`` ``(B, ratios, C_in, ih, iw)`` or None."""

    image: Tensor
    mask: Tensor
    contexts: Tensor | None = None

    def __len__(self) -> int:
        return int(self.image.shape[0])


def collate_backbone(items: list[BackboneItem]) -> BackboneBatch:
    contexts = None if items[0].contexts is None else torch.stack([i.contexts for i in items])  # type: ignore[misc]
    return BackboneBatch(torch.stack([i.image for i in items]), torch.stack([i.mask for i in items]),
                         contexts)


@dataclass
class RefinerItem:
    """A refiner-phase sample: one crop window of a finer stage (s >= 1), what the refiner
    needs of it before the frozen backbone runs (that runs batched, in the training loop).

    ``fine`` ``(C_in, wh, ww)``: the stage image's window grown by the margin (the training
    window), the crop at ``offset`` ``(2,)`` in it; ``mask`` ``(ch, cw)`` int64; ``size``
    ``(2,)`` the stage's size; ``box`` ``(4,)`` top, left, height, width of the crop.
    Exactly one of ``coarse`` ``(classes, ch, cw)`` (the crop's window of the cached stage-0
    probabilities) and ``scene0`` ``(C_in, h0, w0)`` (the whole scene at ``scales[0]``, for
    the loop to run stage 0 on). ``contexts``: one ``(C_in, r*wh, r*ww)`` per context ratio
    of a multi-context backbone, else None.
    """

    fine: Tensor
    offset: Tensor
    mask: Tensor
    size: Tensor
    box: Tensor
    coarse: Tensor | None = None
    scene0: Tensor | None = None
    contexts: list[Tensor] | None = None


@dataclass
class RefinerBatch(_Pinnable):
    """``RefinerItem``s stacked along a first dimension B, except ``scene0``, a list (its
    sizes differ between scenes), and ``contexts``, one ``(B, C_in, r*wh, r*ww)`` per ratio."""

    fine: Tensor
    offset: Tensor
    mask: Tensor
    size: Tensor
    box: Tensor
    coarse: Tensor | None = None
    scene0: list[Tensor] | None = None
    contexts: list[Tensor] | None = None

    def __len__(self) -> int:
        return int(self.mask.shape[0])


def collate_refiner(items: list[RefinerItem]) -> RefinerBatch:
    first = items[0]

    def stack(name: str) -> Tensor:
        return torch.stack([getattr(item, name) for item in items])

    return RefinerBatch(
        fine=stack("fine"), offset=stack("offset"), mask=stack("mask"), size=stack("size"),
        box=stack("box"),
        coarse=None if first.coarse is None else stack("coarse"),
        scene0=None if first.scene0 is None else [item.scene0 for item in items],  # type: ignore[misc]
        contexts=(None if first.contexts is None
                  else [torch.stack(group) for group in zip(*(item.contexts for item in items))]),  # type: ignore[arg-type]
    )
