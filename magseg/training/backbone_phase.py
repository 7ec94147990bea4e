"""Phase "backbone": one segmenter learns windows at every stage's magnification
(``BackboneSamples``), from pretrained encoder weights or from a resumed checkpoint."""

from __future__ import annotations

from torch import Tensor, nn

from magseg.checkpoint import Checkpoint, load_state
from magseg.config import Config
from magseg.engine.backbone import context_ratios, input_multiple, run_backbone
from magseg.segmenter import create_segmenter_model
from magseg.training.batches import BackboneBatch, collate_backbone
from magseg.training.losses import segmentation_loss
from magseg.training.phase import PhaseParts, scene_cache
from magseg.training.samples import BackboneSamples
from magseg.training.state import RunPrecision, RunState


def backbone_loss(model: nn.Module, backbone: nn.Module, batch: BackboneBatch, config: Config,
                  precision: RunPrecision) -> tuple[Tensor, int]:
    """The loss of one batch of windows, under the training autocast.

    ``model`` is what runs (the backbone, or its DDP wrapper); ``backbone`` the bare module.
    Returns the loss and the batch size.
    """
    device = precision.device
    with precision.training():
        image, mask = batch.image.to(device, non_blocking=True), batch.mask.to(device, non_blocking=True)
        contexts = None if batch.contexts is None else list(batch.contexts.to(device, non_blocking=True).unbind(1))
        # In the layout the model is in (RunState.memory_format).
        logits = run_backbone(model, image, input_multiple(backbone), contexts, config.train.channels_last)
        return segmentation_loss(logits, mask, config.train.ohem), image.shape[0]


def backbone_parts(state: RunState, resume: Checkpoint | None) -> PhaseParts:
    """The backbone to train (pretrained weights, or ``resume``'s) and its samples."""
    config, train = state.config, state.config.train
    backbone = create_segmenter_model(config, pretrained=resume is None)
    if resume is not None:
        load_state(backbone, resume.backbone, "backbone", resume.path)
    backbone.to(state.device, memory_format=state.memory_format).train()
    dataset = BackboneSamples(state.train_scenes, config, train.samples_per_epoch, train.seed,
                              augment=train.augment, ratios=context_ratios(backbone),
                              cache=scene_cache(state))
    return PhaseParts("backbone", train.epochs, train.lr, backbone, None, backbone, dataset,
                      collate_backbone, backbone_loss)
