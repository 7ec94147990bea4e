"""Device strings: the one place that says which are valid and whether this machine has them.

Valid forms: ``cpu``, ``cuda``, ``cuda:N`` (N = 0, 1, ...) and ``mps``. ``check_device_name``
checks the form only (config validation: a checkpoint trained on a GPU still loads on a
machine without one, to run with ``--device cpu``); ``resolve_device`` also checks that this
machine has the device, just before it is used.
"""

from __future__ import annotations

import re

from magseg.errors import ConfigError

DEVICE_FORMS = "cpu, cuda, cuda:N (N = 0, 1, ...) or mps"
_PATTERN = re.compile(r"(cpu|cuda|cuda:\d+|mps)")


def check_device_name(text: str) -> str:
    """``text`` stripped and lower-cased when it is one of the valid forms.

    Raises:
        ValueError: any other string (``gpu``, ``tpu``, ``cuda:x``...), with the valid forms.
    """
    name = str(text).strip().lower()
    if not _PATTERN.fullmatch(name):
        raise ValueError(f"not a device; use {DEVICE_FORMS}")
    return name


def resolve_device(text: str, source: str = "engine.device"):
    """The ``torch.device`` for ``text``, checked against this machine.

    Raises:
        ConfigError: not a valid form, or a device this machine does not have (one line,
            naming ``source`` and the devices there are).
    """
    import torch

    label = f"{source} {text}" if source.startswith("-") else f"{source}={text}"
    try:
        name = check_device_name(text)
    except ValueError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{label}: no CUDA device is available on this machine; "
                              "use --device cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{label}: this machine has {count} CUDA device(s), "
                              f"cuda:0..cuda:{count - 1}; use one of them or --device cpu")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"{label}: MPS (Apple GPU) is not available on this machine; "
                              "use --device cpu")
    return device
