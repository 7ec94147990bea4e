"""The resolved configuration: frozen dataclasses, validated; YAML only at the edge.

A config file is YAML with the sections below; every key can be overridden from the command
line as ``section.key=value`` (the value is parsed as YAML, so ``pyramid.scales=[256,512]``
works). Sizes are ``(H, W)`` everywhere; a single integer means a square.

The checkpoint embeds ``Config.to_dict()``, so ``predict`` and ``benchmark`` rebuild exactly
what training used from the checkpoint alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BeforeValidator, ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from magseg.errors import ConfigError

# NaN and infinity are no value any key can take (a threshold of nan compares false with
# everything and would silently switch a check off).
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)

# Counts (batch sizes, epochs, samples) above this are no run anyone can make; beyond 2**63
# they fail deep inside Python or torch instead of here.
MAX_COUNT = 2**31 - 1


def _counts_within(section: str, **values: int | None) -> None:
    for key, value in values.items():
        if value is not None and value > MAX_COUNT:
            raise ValueError(f"{section}.{key}={value} is larger than any run can use "
                             f"(at most {MAX_COUNT})")


def _as_size(value: Any) -> Any:
    """``512`` -> ``(512, 512)``; ``[h, w]`` stays a pair."""
    if isinstance(value, bool):
        raise ValueError("a size is an integer or a pair [H, W]")
    if isinstance(value, int):
        return (value, value)
    return value


def _positive_size(value: tuple[int, int]) -> tuple[int, int]:
    if len(value) != 2 or min(value) < 1:
        raise ValueError(f"a size is [H, W] with both >= 1, got {list(value)}")
    return (int(value[0]), int(value[1]))


Size = Annotated[tuple[int, int], BeforeValidator(_as_size)]


@dataclass(frozen=True, config=_STRICT)
class ClassSpec:
    """One output class: its id (0..n-1), name, display colour and whether it counts in mIoU."""

    id: int
    name: str
    color: tuple[int, int, int] = (0, 0, 0)
    in_mean: bool = True


@dataclass(frozen=True, config=_STRICT)
class ModelConfig:
    """The backbone segmenter: any segmentation-models-pytorch architecture and encoder."""

    arch: str = "Unet"
    encoder: str = "resnet18"
    # "imagenet" (needs a network, except for timm-tf_efficientnet_lite0), a state dict file
    # (timm, torchgeo or smp names: magseg.models.pretrained) or None.
    encoder_weights: str | None = None
    in_channels: int = 3
    # Extra keyword arguments for the smp constructor (e.g. decoder_channels).
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.in_channels < 1:
            raise ValueError("model.in_channels must be >= 1")
        if isinstance(self.encoder_weights, str) and self.encoder_weights.lower() in ("none", ""):
            object.__setattr__(self, "encoder_weights", None)


@dataclass(frozen=True, config=_STRICT)
class RefinerConfig:
    """The refinement module (see magseg.engine.refiner_network). ``enabled: false`` means refined = fine."""

    enabled: bool = True
    channels: int = 32
    # The context branch runs at 1/context_stride of the crop resolution (speed).
    context_stride: int = 4
    # A per-pixel gate, from full-resolution cues, between keeping the fine prediction and
    # taking the correction (magseg.engine.refiner_network.RefinerGate): without it the smooth correction
    # can erase small objects the fine view found. Checkpoints without gate weights load
    # as false.
    gate: bool = True

    def __post_init__(self) -> None:
        if self.channels < 1 or self.context_stride < 1:
            raise ValueError("refiner.channels and refiner.context_stride must be >= 1")


def stage_sizes(scales: tuple[tuple[int, int], ...], image_size: tuple[int, int],
                scene: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """The size of each stage for an image of ``image_size``.

    ``scales`` are the stage sizes of a reference scene of size ``scene`` (default
    ``scales[-1]``); an image of another size keeps the same magnifications, so each stage
    is scaled per axis by ``image_size / scene`` (a 2448 image with scales 612/1224/2448
    gets exactly those).
    """
    (h, w) = image_size
    (sh, sw) = scene if scene is not None else scales[-1]
    if (h, w) == (sh, sw):
        return [tuple(s) for s in scales]
    return [(max(1, round(h * s[0] / sh)), max(1, round(w * s[1] / sw))) for s in scales]


def check_margin(margin: int | float, key: str) -> None:
    """A context margin is a fraction in [0, 1) of the crop or a count of pixels >= 0."""
    if isinstance(margin, bool) or margin < 0 or (isinstance(margin, float) and margin >= 1):
        raise ValueError(f"{key} must be a fraction in [0, 1) of the crop or a count of "
                         f"stage pixels >= 0, got {margin}")


def margin_pixels(margin: int | float, crop: Size) -> Size:
    """A margin in stage pixels ``(rows, cols)``: a ``float`` fraction of ``crop`` rounded, or
    an ``int`` count."""
    if isinstance(margin, float):
        return round(margin * crop[0]), round(margin * crop[1])
    return int(margin), int(margin)


@dataclass(frozen=True, config=_STRICT)
class PyramidConfig:
    """Stage sizes coarse to fine, the crop size at every stage, and the backbone input size.

    ``scene``: the reference scene size the scales are given for (default: the finest
    scale, i.e. magnification 1 at the last stage). An image of another size keeps the same
    magnifications (see ``magseg.engine.pyramid.stage_sizes``).

    ``margin``: context each crop's backbone sees beyond the crop on every side where the
    stage image has pixels, a ``float`` fraction in [0, 1) of the crop or an ``int`` count
    of stage pixels (``magseg.engine.pyramid.grown_windows``); neighbouring crops' answers
    are blended over the inner half of it (``magseg.engine.blend``). The default, an eighth
    of the crop, is what removes the crop grid from the map at 1.5x the backbone's work
    (docs/prediction.md); 0 cuts crops edge to edge.
    """

    scales: tuple[Size, ...]
    crop: Size
    input: Size
    scene: Size | None = None
    margin: int | float = 0.125

    def __post_init__(self) -> None:
        if not self.scales:
            raise ValueError("pyramid.scales needs at least one size")
        scales = tuple(_positive_size(s) for s in self.scales)
        for coarse, fine in zip(scales, scales[1:]):
            if fine[0] < coarse[0] or fine[1] < coarse[1]:
                raise ValueError(
                    f"pyramid.scales must grow coarse to fine, got {[list(s) for s in scales]}"
                )
        object.__setattr__(self, "scales", scales)
        object.__setattr__(self, "crop", _positive_size(self.crop))
        object.__setattr__(self, "input", _positive_size(self.input))
        scene = scales[-1] if self.scene is None else _positive_size(self.scene)
        object.__setattr__(self, "scene", scene)
        check_margin(self.margin, "pyramid.margin")

    @property
    def margin_pixels(self) -> tuple[int, int]:
        """The margin in stage pixels ``(rows, cols)``: a fraction of the crop rounded."""
        return margin_pixels(self.margin, self.crop)

    def stage_sizes(self, image_size: tuple[int, int]) -> list[tuple[int, int]]:
        """Each stage's size for an image of ``image_size`` (H, W)."""
        return stage_sizes(self.scales, image_size, self.scene)

    def downsample_only(self) -> "PyramidConfig":
        """Baseline: the stage-0 view alone (upsampled to the image by the engine)."""
        return PyramidConfig(scales=self.scales[:1], crop=self.crop, input=self.input, scene=self.scene,
                             margin=self.margin)

    def patch_only(self) -> "PyramidConfig":
        """Baseline: the finest scale alone, crops stitched, no context."""
        return PyramidConfig(scales=self.scales[-1:], crop=self.crop, input=self.input, scene=self.scene,
                             margin=self.margin)


@dataclass(frozen=True, config=_STRICT)
class CrfConfig:
    """A CRF over the final probabilities, guided by the image (magseg.engine.crf,
    docs/crf.md); off by default.

    Mean-field inference of a Potts CRF with a Gaussian (position) and a bilateral (position
    and pixel values) kernel, as DeepLab runs Krähenbühl and Koltun's dense CRF; the defaults
    are DeepLab's (its run_densecrf.sh: 10 iterations, Gaussian 3 / 3, bilateral 49 / 5 / 4).
    ``method``: ``local`` (pure torch, each pixel's kernels over a ``window`` x ``window``
    square, ConvCRF-style; any device) or ``dense`` (pydensecrf2, the ``magseg[densecrf]``
    extra; fully connected within each tile). ``bilateral_srgb`` is in the raster's own pixel
    units (DeepLab's 5 is for 8-bit RGB).
    """

    enabled: bool = False
    method: Literal["local", "dense"] = "local"
    iterations: int = 10
    window: int = 7
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 49.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 4.0

    def __post_init__(self) -> None:
        if not 1 <= self.iterations <= 100:
            raise ValueError(f"refine.crf.iterations must be in 1..100, got {self.iterations}")
        if self.window < 3 or self.window % 2 == 0 or self.window > 31:
            raise ValueError(f"refine.crf.window must be odd, 3..31, got {self.window}")
        for key in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if getattr(self, key) <= 0:
                raise ValueError(f"refine.crf.{key} must be > 0, got {getattr(self, key)}")
        for key in ("gaussian_compat", "bilateral_compat"):
            if getattr(self, key) < 0:
                raise ValueError(f"refine.crf.{key} must be >= 0, got {getattr(self, key)}")


@dataclass(frozen=True, config=_STRICT)
class RefineConfig:
    """Which pixels take the refined prediction at each stage.

    ``points``: K, an ``int`` count per crop, or a ``float`` fraction in [0, 1] of the pixels a
    crop owns. ``kernel``: median-blur size for the error map (odd; 1 = no blur).
    ``border``: pixels within this many stage pixels of a crop border inside the image are
    picked last (the coarser stage, which saw across the border, keeps them unless K needs
    them); 0 = no border term. ``crf``: a CRF over the final probabilities (off by default).
    """

    points: int | float = 0.75
    kernel: int = 11
    crf: CrfConfig = CrfConfig()
    border: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.points, bool) or self.points < 0:
            raise ValueError(f"refine.points must be a count >= 0 or a fraction, got {self.points}")
        if isinstance(self.points, float) and self.points > 1:
            raise ValueError(
                f"refine.points={self.points}: a float is a fraction in [0, 1]; "
                "write an integer for a count of pixels"
            )
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"refine.kernel must be odd and >= 1, got {self.kernel}")
        if self.border < 0:
            raise ValueError(f"refine.border is a count of stage pixels >= 0, got {self.border}")


@dataclass(frozen=True, config=_STRICT)
class AdaptiveConfig:
    """Skip crops that cannot gain much: below ``threshold`` mean coarse uncertainty, or beyond
    the ``max_crops`` most uncertain of a stage. Both None = the full method."""

    threshold: float | None = None
    max_crops: int | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ValueError("engine.adaptive.threshold is a mean uncertainty in [0, 1], "
                             f"got {self.threshold}")
        if self.max_crops is not None and self.max_crops < 0:
            raise ValueError(f"engine.adaptive.max_crops must be >= 0, got {self.max_crops}")
        _counts_within("engine.adaptive", max_crops=self.max_crops)

    @property
    def enabled(self) -> bool:
        return self.threshold is not None or self.max_crops is not None


@dataclass(frozen=True, config=_STRICT)
class EngineConfig:
    """How the engine runs: batch size of crops, device and numeric precision."""

    batch_size: int = 4
    device: str = "cpu"
    # auto: fp16 on CUDA, bf16 on CPUs with native bf16 (AVX512-BF16/AMX), else fp32.
    # int8: the backbone's int8 graph in OpenVINO, and the refiner's convolutions' where
    # there is one (runtime openvino; `magseg quantize` makes them).
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto"
    # NHWC convolutions: the layout oneDNN's CPU convolutions run fastest in, with the same
    # results (figures: docs/performance.md#channels-last).
    channels_last: bool = True
    adaptive: AdaptiveConfig = AdaptiveConfig()
    # What runs the backbone: torch eager, or an exported graph in ONNX Runtime or OpenVINO
    # (the extras magseg[onnx], magseg[openvino]); auto: the fastest installed for the device
    # (magseg.engine.runtime, docs/runtimes.md).
    runtime: Literal["torch", "onnxruntime", "openvino", "auto"] = "torch"
    # Where exported graphs are kept (None: $MAGSEG_CACHE_DIR, else the user cache directory,
    # ~/.cache/magseg).
    cache_dir: str | None = None
    # Test-time augmentation: every crop's probabilities averaged over left-right flips
    # (flip, 2 backbone runs per crop) or the 8 flips and rotations (d4); magseg.engine.tta.
    tta: Literal["none", "flip", "d4"] = "none"
    # The per-pixel work after the backbone (the refine step, the blend, resampling) as
    # compiled loops on a CPU (numba; magseg.engine.fused): auto on stages of a megapixel
    # or more, true for every stage, false for none (ATen's passes; the values agree to
    # float rounding, docs/performance.md).
    compiled: Literal["auto"] | bool = "auto"

    def __post_init__(self) -> None:
        from magseg.device import check_device_name

        if self.batch_size < 1:
            raise ValueError("engine.batch_size must be >= 1")
        _counts_within("engine", batch_size=self.batch_size)
        # The form only: whether this machine has the device is checked where it is used
        # (magseg.device.resolve_device), so a GPU-trained checkpoint loads on a CPU.
        try:
            object.__setattr__(self, "device", check_device_name(self.device))
        except ValueError as exc:
            raise ValueError(f"engine.device={self.device}: {exc}") from None


# The dataset layouts magseg reads (``data.layout``; the files of each: magseg.data.scenes).
# Written once: the schema checks against it and ``--layout`` offers it.
Layout = Literal["deepglobe", "geotiff"]
LAYOUTS: tuple[str, ...] = get_args(Layout)


@dataclass(frozen=True, config=_STRICT)
class DataConfig:
    """Where the data is and how pixels become model input.

    ``bands``: 1-based band indices to read, in the order the model sees them (None = all).
    ``mean``/``std``: per model channel, in the raw pixel units; computed from the training
    split when None and stored in the checkpoint.
    ``class_map``: ``{code in the mask files: class id}`` for class-id masks coded otherwise
    (ESA WorldCover's 10, 20, ..., 100); codes it does not list are ``unmapped``: ``error``
    (refused, named with the file) or ``ignore`` (left out of the loss and the scores).
    """

    layout: Layout = "deepglobe"
    root: str | None = None
    bands: tuple[int, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    train_split: str = "train.txt"
    val_split: str = "val.txt"
    test_split: str = "test.txt"
    class_map: dict[int, int] | None = None
    unmapped: Literal["error", "ignore"] = "error"

    def __post_init__(self) -> None:
        if self.class_map is not None:
            if not self.class_map:
                raise ValueError("data.class_map is empty; leave it out, or map codes to class ids")
            bad = {k: v for k, v in self.class_map.items() if not (0 <= v <= 255 and 0 <= k)}
            if bad:
                raise ValueError(f"data.class_map maps codes >= 0 to class ids 0..254 (255 = ignore), "
                                 f"got {bad}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"data.std must be > 0 for every channel (it divides the pixels), "
                             f"got {list(self.std)}")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError(f"data.mean has {len(self.mean)} values but data.std {len(self.std)}")
        if self.bands is not None and min(self.bands, default=1) < 1:
            raise ValueError(f"data.bands are 1-based band numbers, got {list(self.bands)}")


@dataclass(frozen=True, config=_STRICT)
class TrainConfig:
    """Optimisation settings for the two training phases."""

    epochs: int = 10
    refiner_epochs: int = 5
    batch_size: int = 8
    lr: float = 1e-3
    refiner_lr: float = 1e-3
    weight_decay: float = 1e-4
    samples_per_epoch: int = 256
    val_every: int = 1
    # DataLoader worker processes: a count, or auto (the cores this process may use, less one
    # for the training loop, at most 8; 0 on one core). See magseg.training.loader.
    num_workers: int | Literal["auto"] = "auto"
    seed: int = 0
    # Fraction of the hardest pixels a batch's loss keeps (online hard example mining).
    ohem: float | None = None
    # Flips, 90-degree rotations (square inputs) and light brightness/contrast jitter.
    augment: bool = True
    # Refiner phase: samples per epoch (None: samples_per_epoch).
    refiner_samples_per_epoch: int | None = None
    # Which checkpoint of --out-dir the refiner phase takes its frozen backbone from.
    backbone_from: Literal["best", "last"] = "best"
    # Learning rate decays as (1 - step / steps) ** poly_power over a phase.
    poly_power: float = 0.9
    # Validate on at most this many scenes of the val split (None: all).
    val_max_scenes: int | None = None
    # Train the backbone in the NHWC layout: faster steps on a CPU, the same losses to three
    # digits (docs/performance.md#channels-last). Off by default so that a run reproduces
    # the published figures, which were trained in the standard layout, to the digit.
    channels_last: bool = False
    # Forward passes under autocast: fp32 (none), bf16, or fp16 with a gradient scaler.
    # Weights, optimiser state and checkpoints stay fp32 whichever is chosen.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Refiner loss pixels, PointRend-style: N = refiner_points * crop pixels per window,
    # the refiner_importance * N most uncertain of refiner_oversample * N random candidates
    # plus the rest drawn uniformly. None: every pixel. Off by default: with the gate, the
    # dense plain loss is the one that kept the demo's mIoU (docs/refiner.md#measured).
    refiner_points: float | None = None
    refiner_oversample: float = 3.0
    refiner_importance: float = 0.75
    # Refiner loss class balancing, 0 (plain cross-entropy) to 1 (every class present in a
    # batch weighs the same): pixels weighted by (class pixel count) ** -refiner_balance.
    refiner_balance: float = 0.0
    # Keep only this fraction of the refiner's hardest loss points (OHEM); None: all.
    refiner_ohem: float | None = None
    # After the refiner phase, validate without the refiner too and store the better
    # choice in best.ckpt's refiner.enabled (predict and benchmark follow it).
    refiner_choice: bool = True
    # With refiner_choice: the K (refine.points, fractions) also tried on the validation
    # split, each with and without the refiner; the best pair is stored in best.ckpt. On
    # data where context adds little a lower K keeps pixels on the coarser answer that the
    # patch alone gets right. Empty: only refine.points.
    choose_k: tuple[float, ...] = (0.5, 0.75, 0.9, 1.0)
    # The context margin of training windows, as pyramid.margin is given; None: pyramid.margin
    # (the model sees what prediction feeds it). 0 trains on crop-sized windows, at 1/1.56
    # of the backbone's work at the default margin, for a model that then predicts with
    # pyramid.margin all the same (docs/prediction.md has what each gives).
    margin: int | float | None = None

    def __post_init__(self) -> None:
        if self.margin is not None:
            check_margin(self.margin, "train.margin")
        if any(not 0 < k <= 1 for k in self.choose_k):
            raise ValueError(f"train.choose_k are fractions of a crop's pixels in (0, 1], got {list(self.choose_k)}")
        if self.refiner_points is not None and not 0 < self.refiner_points <= 1:
            raise ValueError(f"train.refiner_points is a fraction in (0, 1], got {self.refiner_points}")
        if self.refiner_oversample < 1:
            raise ValueError(f"train.refiner_oversample must be >= 1, got {self.refiner_oversample}")
        if not 0 <= self.refiner_importance <= 1:
            raise ValueError(f"train.refiner_importance is a fraction in [0, 1], got {self.refiner_importance}")
        if not 0 <= self.refiner_balance <= 1:
            raise ValueError(f"train.refiner_balance must be in [0, 1], got {self.refiner_balance}")
        if self.refiner_ohem is not None and not 0 < self.refiner_ohem <= 1:
            raise ValueError(f"train.refiner_ohem is a fraction in (0, 1], got {self.refiner_ohem}")
        if self.epochs < 0 or self.refiner_epochs < 0:
            raise ValueError("train.epochs and train.refiner_epochs must be >= 0")
        if self.batch_size < 1 or self.samples_per_epoch < 1 or self.val_every < 1:
            raise ValueError("train.batch_size, train.samples_per_epoch and train.val_every must be >= 1")
        if self.ohem is not None and not 0 < self.ohem <= 1:
            raise ValueError(f"train.ohem is a fraction in (0, 1], got {self.ohem}")
        if isinstance(self.num_workers, int) and self.num_workers < 0:
            raise ValueError(f"train.num_workers must be >= 0 or auto, got {self.num_workers}")
        _counts_within("train", epochs=self.epochs, refiner_epochs=self.refiner_epochs,
                       batch_size=self.batch_size, samples_per_epoch=self.samples_per_epoch,
                       val_every=self.val_every,
                       num_workers=self.num_workers if isinstance(self.num_workers, int) else None,
                       refiner_samples_per_epoch=self.refiner_samples_per_epoch,
                       val_max_scenes=self.val_max_scenes)


@dataclass(frozen=True, config=_STRICT)
class Config:
    """Everything magseg needs to train, predict and benchmark one model."""

    pyramid: PyramidConfig
    classes: tuple[ClassSpec, ...]
    name: str = "magseg"
    model: ModelConfig = ModelConfig()
    refiner: RefinerConfig = RefinerConfig()
    refine: RefineConfig = RefineConfig()
    engine: EngineConfig = EngineConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    def __post_init__(self) -> None:
        ids = [c.id for c in self.classes]
        if ids != list(range(len(ids))):
            raise ValueError(f"classes must have ids 0..n-1 in order, got {ids}")
        if len(ids) < 2:
            raise ValueError("at least two classes are needed (certainty compares top-2)")
        if len(ids) > 255:
            raise ValueError("at most 255 classes: label maps are uint8 with 255 as nodata")
        if not any(c.in_mean for c in self.classes):
            raise ValueError("at least one class must have in_mean: true")
        if self.data.bands is not None and len(self.data.bands) != self.model.in_channels:
            raise ValueError(
                f"data.bands has {len(self.data.bands)} bands but model.in_channels is "
                f"{self.model.in_channels}"
            )
        for key in ("mean", "std"):
            values = getattr(self.data, key)
            if values is not None and len(values) != self.model.in_channels:
                raise ValueError(f"data.{key} has {len(values)} values but model.in_channels is "
                                 f"{self.model.in_channels}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of JSON types (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    def override(self, overrides: Mapping[str, Any] | Sequence[str]) -> "Config":
        """A copy with dotted-key overrides, e.g. ``override({"refine.points": 0})`` or
        ``override(["refine.points=0"])``."""
        data = self.to_dict()
        items = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
        for key, value in items.items():
            _set_dotted(data, key, value, source="override")
        return config_from_dict(data, source="(with overrides)")


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_CONFIG_ADAPTER = TypeAdapter(Config)


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Validate a nested mapping into a Config; errors name ``source`` and the bad key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"invalid config {source}: a mapping of sections is needed, "
                          f"got {type(data).__name__}")
    try:
        return _CONFIG_ADAPTER.validate_python(dict(data))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "unexpected_keyword_argument":
                msg = "unknown key"
            elif err["type"] == "value_error":
                msg = msg.removeprefix("Value error, ")
            lines.append(f"  {loc}: {msg}")
        if len(lines) == 1:  # one line for one problem
            raise ConfigError(f"invalid config {source}: {lines[0].strip()}") from None
        raise ConfigError(f"invalid config {source}:\n" + "\n".join(lines)) from None


def _set_dotted(data: dict[str, Any], key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(
                f"{source}: cannot set {key!r}: {'.'.join(parts[: i + 1])!r} is not a section"
            )
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["a.b=3", "c=[1,2]"]`` -> ``{"a.b": 3, "c": [1, 2]}`` (values parsed as YAML)."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.epochs=5)")
        if any("\udc80" <= c <= "\udcff" for c in item):
            # A command-line byte that is not UTF-8 arrives as a lone surrogate (PEP 383).
            raise ConfigError(f"override {item!r} holds bytes that are not UTF-8 text; give the "
                              "value in UTF-8")
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({yaml_problem(exc)})") from None
    return parsed


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error on one line: where (line, column: 1-based) and what; its own message
    spans several lines, with the offending text and a caret under it."""
    mark = problem = context = None
    if isinstance(exc, yaml.MarkedYAMLError):
        mark, problem, context = exc.problem_mark or exc.context_mark, exc.problem, exc.context
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    if isinstance(exc, yaml.reader.ReaderError):
        problem = f"character {exc.character:#x} is not allowed ({exc.reason})"
    elif problem and "constructor for the tag" in problem:
        tag = problem.rpartition("tag ")[2].strip("'").replace("tag:yaml.org,2002:", "!!")
        problem = f"the tag {tag} is not allowed (magseg reads plain YAML values only)"
    if problem is None:
        return " ".join(str(exc).split())
    return where + (f"{problem} ({context})" if context else problem)


def load_config(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] = ()) -> Config:
    """Read a YAML config file, apply ``key=value`` overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (see configs/ for examples)") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; give a YAML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte "
                          f"{exc.object[exc.start]:#04x} at offset {exc.start}); "
                          "save it as UTF-8 YAML") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections at the top level")
    items = overrides.items() if isinstance(overrides, Mapping) else parse_overrides(overrides).items()
    for key, value in items:
        _set_dotted(data, key, value, source=str(path))
    return config_from_dict(data, source=str(path))
