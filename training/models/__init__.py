"""Model registry: model id -> (module class, config dataclass).

Every model is an ``nn.Module`` with:
* ``input_names``: tuple of ``app.analysis.inputs`` names read by ``forward`` (in argument order);
  it depends on the variant (an audio-only variant reads no text input);
* ``forward(*tensors) -> logits`` shaped (batch, classes), padding-invariant given the masks;
* a constructor ``(config, n_classes, stats)`` where ``stats`` maps an input name to
  ``(mean, std)`` arrays over its last axis, computed on the training split; models normalise
  their inputs with them inside the graph, so ONNX inputs are raw features.
"""

from __future__ import annotations

import dataclasses
import importlib

# id -> (module, class name, config class name)
REGISTRY = {
    "cmt-awc": ("training.models.cmt_awc", "CmtAwc", "CmtAwcConfig"),
    "ca-mser": ("training.models.ca_mser", "CaMser", "CaMserConfig"),
    "adf": ("training.models.adf", "Adf", "AdfConfig"),
    "3m-ser": ("training.models.three_m_ser", "ThreeMSer", "ThreeMSerConfig"),
}
MODEL_IDS = tuple(REGISTRY)


def model_classes(model_id: str):
    if model_id not in REGISTRY:
        raise KeyError(f"unknown model id {model_id!r}; choose from {', '.join(MODEL_IDS)}")
    module_name, cls_name, cfg_name = REGISTRY[model_id]
    module = importlib.import_module(module_name)
    return getattr(module, cls_name), getattr(module, cfg_name)


def build_model(model_id: str, n_classes: int, stats: dict | None = None, **overrides):
    """Build a model; ``overrides`` set config fields (e.g. ``variant="sa-correction"``)."""
    cls, cfg_cls = model_classes(model_id)
    cfg = cfg_cls(**overrides)
    return cls(cfg, n_classes, stats or {}), cfg


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
