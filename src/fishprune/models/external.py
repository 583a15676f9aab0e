"""Models from outside the zoo, named by a spec: ``timm:NAME``, ``torchvision:NAME``,
``hf:MODEL_TYPE`` or ``package.module:factory``.

Every external model is built untrained, for the dataset's input shape and number of classes,
from the global torch generator (seed it with ``torch.manual_seed`` first, as for the zoo);
nothing is ever downloaded:

- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, num_classes=, in_chans=,
  **kwargs)`` (``img_size=`` too where the model takes it, e.g. ViTs).
- ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, num_classes=,
  **kwargs)``; torchvision's classifiers take 3-channel input only.
- ``hf:MODEL_TYPE``: a ``transformers`` config from the model type's defaults and ``kwargs``
  (``AutoConfig.for_model``; ``num_labels``, ``num_channels`` and ``image_size`` from the data
  where the config has them), then ``AutoModelForImageClassification.from_config`` (or
  ``AutoModelForSequenceClassification`` for model types without an image head), wrapped in
  :class:`LogitsOnly` so that ``model(x)`` is the logits tensor; parameter names read
  ``model.<hf name>`` (``model.vit.encoder.layer.0...``).
- ``package.module:factory``: the user's own code, imported from ``sys.path`` (the working
  directory first); ``factory`` is called with ``num_classes=``, ``in_channels=`` and
  ``image_size=`` where its signature accepts them, plus ``kwargs``, and must return an
  ``nn.Module`` mapping (N, C, H, W) images to (N, num_classes) logits.

timm, torchvision and transformers are optional extras (``pip install 'fishprune[timm]'``...):
a missing or broken one is a one-line :class:`ExternalModelError` naming the extra.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

#: Spec prefix → (the package it imports, the fishprune extra that installs it).
LIBRARIES: dict[str, tuple[str, str]] = {
    "timm": ("timm", "timm"),
    "torchvision": ("torchvision", "torchvision"),
    "hf": ("transformers", "hf"),
}
_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
#: Settings the data decides; a model kwarg may repeat them only with the same value.
_DATA_KEYS = ("num_classes", "in_channels", "image_size")


class ExternalModelError(ValueError):
    """An external model spec that cannot be built (a one-line message)."""


def is_external(name: str) -> bool:
    """Whether ``name`` is an external model spec (has a ``prefix:`` part)."""
    return ":" in name


def check_spec(name: str) -> None:
    """Raise :class:`ExternalModelError` unless ``name`` is a well-formed external spec."""
    prefix, _, rest = name.partition(":")
    if prefix in LIBRARIES:
        if not rest.strip():
            raise ExternalModelError(f"model {name!r} names no {prefix} model after '{prefix}:'")
        return
    if not _FACTORY.match(name):
        raise ExternalModelError(
            f"model {name!r} is neither a zoo model, timm:NAME, torchvision:NAME, "
            "hf:MODEL_TYPE nor package.module:factory")


def available(prefix: str) -> bool:
    """Whether the library behind ``prefix`` is installed (not whether it imports)."""
    return importlib.util.find_spec(LIBRARIES[prefix][0]) is not None


def _import(prefix: str) -> Any:
    package, extra = LIBRARIES[prefix]
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ExternalModelError(f"'{prefix}:' models need {package}: "
                                 f"pip install 'fishprune[{extra}]'") from None
    except Exception as err:  # e.g. a torchvision build that does not match torch
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ExternalModelError(f"'{prefix}:' models need {package}, which is installed but "
                                 f"does not import ({first}): reinstall a build matching "
                                 f"torch, e.g. pip install 'fishprune[{extra}]'") from None


def _check_data_kwargs(kwargs: dict[str, Any], data: dict[str, int], spelled: dict[str, str]
                       ) -> dict[str, Any]:
    """Drop model kwargs that repeat what the data decides; refuse ones that contradict it."""
    out = dict(kwargs)
    for key, value in data.items():
        name = spelled.get(key, key)
        if name in out:
            if out[name] != value:
                raise ExternalModelError(f"model kwarg {name}={out[name]!r} contradicts the "
                                         f"dataset ({key} {value})")
            del out[name]
    return out


class LogitsOnly(nn.Module):
    """``model(pixel_values=x).logits``: a ``transformers`` classifier as ``x ↦ logits``.

    The wrapped model is the child ``model``, so parameter names are ``model.<its names>``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        if x.is_floating_point():
            return self.model(pixel_values=x).logits
        return self.model(input_ids=x).logits


def _timm(name: str, data: dict[str, int], kwargs: dict[str, Any]) -> nn.Module:
    timm = _import("timm")
    # The data decides num_classes, in_chans and img_size (a kwarg may only repeat them).
    kwargs = _check_data_kwargs(kwargs, data, {"num_classes": "num_classes",
                                               "in_channels": "in_chans", "image_size": "img_size"})
    if not timm.models.is_model(name):
        raise ExternalModelError(f"timm has no model {name!r} (see timm.list_models())")
    extra = {"num_classes": data["num_classes"], "in_chans": data["in_channels"]}
    rng = torch.random.get_rng_state()
    try:  # transformers-like models (ViT, Swin...) fix their input size; CNNs take no img_size
        return timm.create_model(name, pretrained=False, img_size=data["image_size"], **extra,
                                 **kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
    torch.random.set_rng_state(rng)  # the retry draws the weights the first try would have
    return timm.create_model(name, pretrained=False, **extra, **kwargs)


def _torchvision(name: str, data: dict[str, int], kwargs: dict[str, Any]) -> nn.Module:
    tv = _import("torchvision")
    kwargs = _check_data_kwargs(kwargs, {"num_classes": data["num_classes"]}, {})
    if data["in_channels"] != 3:
        raise ExternalModelError(f"torchvision:{name} takes 3-channel images; the dataset has "
                                 f"{data['in_channels']}")
    if name not in tv.models.list_models():
        raise ExternalModelError(f"torchvision has no model {name!r} "
                                 "(see torchvision.models.list_models())")
    params = inspect.signature(tv.models.get_model_builder(name)).parameters
    if "image_size" in params or name.startswith("vit_"):  # ViTs fix their input size
        kwargs.setdefault("image_size", data["image_size"])
    return tv.models.get_model(name, weights=None, num_classes=data["num_classes"], **kwargs)


def _hf(model_type: str, data: dict[str, int], kwargs: dict[str, Any]) -> nn.Module:
    transformers = _import("hf")
    try:
        config = transformers.AutoConfig.for_model(model_type, **kwargs)
    except ValueError as err:
        first = str(err).splitlines()[0]
        raise ExternalModelError(f"hf:{model_type}: {first}") from None
    given = set(kwargs)
    for key, attr in (("num_classes", "num_labels"), ("in_channels", "num_channels"),
                      ("image_size", "image_size")):
        if not hasattr(config, attr):
            continue
        if attr in given and getattr(config, attr) != data[key]:
            raise ExternalModelError(f"model kwarg {attr}={getattr(config, attr)!r} contradicts "
                                     f"the dataset ({key} {data[key]})")
        setattr(config, attr, data[key])
    for auto in ("AutoModelForImageClassification", "AutoModelForSequenceClassification"):
        mapping = getattr(transformers, auto)._model_mapping
        if type(config) in mapping:
            # The auto class's own from_config fails where a type maps to several classes
            # (DeiT: with and without teacher) and the config names no architecture: the first.
            target = mapping[type(config)]
            target = target[0] if isinstance(target, (list, tuple)) else target
            return LogitsOnly(target._from_config(config))
    raise ExternalModelError(f"hf:{model_type} has no image- or sequence-classification model "
                             "in transformers")


def _factory(spec: str, data: dict[str, int], kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ExternalModelError(f"model {spec!r}: cannot import {module_name} ({err}); it is "
                                 "looked up on sys.path, the working directory first") from None
    finally:
        if added:
            sys.path.remove(cwd)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ExternalModelError(f"model {spec!r}: {module_name} has no callable {attr!r}")
    model = _call_factory(spec, factory, data, kwargs)
    if not isinstance(model, nn.Module):
        raise ExternalModelError(f"model {spec!r}: the factory returned a "
                                 f"{type(model).__name__}, not a torch.nn.Module")
    return model


def _call_factory(spec: str, factory: Callable[..., Any], data: dict[str, int],
                  kwargs: dict[str, Any]) -> Any:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = _check_data_kwargs(kwargs, data, {})
    given = {k: v for k, v in data.items() if k in params or open_ended}
    try:
        return factory(**given, **kwargs)
    except TypeError as err:
        raise ExternalModelError(f"model {spec!r}: calling the factory with "
                                 f"{sorted({**given, **kwargs})} failed: {err}") from None


def build_external(name: str, *, in_channels: int, num_classes: int, image_size: int,
                   kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build the external model ``name`` (a spec, see the module docstring), untrained."""
    check_spec(name)
    data = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    kwargs = dict(kwargs or {})
    prefix, _, rest = name.partition(":")
    builders = {"timm": _timm, "torchvision": _torchvision, "hf": _hf}
    if prefix in builders:
        return builders[prefix](rest, data, kwargs)
    return _factory(name, data, kwargs)


def spec_help() -> list[str]:
    """One line per kind of external spec, saying whether its library is installed."""
    def state(prefix: str) -> str:
        extra = LIBRARIES[prefix][1]
        return ("installed" if available(prefix)
                else f"not installed: pip install 'fishprune[{extra}]'")

    rows = [
        ("timm:NAME", f"a timm model, e.g. timm:resnet18 ({state('timm')})"),
        ("torchvision:NAME", "a torchvision classifier, e.g. torchvision:resnet18 "
                             f"({state('torchvision')})"),
        ("hf:MODEL_TYPE", "a transformers model built from its config defaults and the model "
                          f"kwargs, never downloaded, e.g. hf:vit ({state('hf')})"),
        ("package.module:factory", "your code, imported from the working directory or "
                                   "sys.path: factory(num_classes=, in_channels=, image_size=, "
                                   "**model_kwargs) -> nn.Module"),
    ]
    return [f"{spec:<24}{text}" for spec, text in rows]
