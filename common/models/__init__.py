"""Model families behind one interface (`common.models.base.DiffusionModel`), chosen by pipeline class.

A saved pipeline names its class in `model_index.json` (`_class_name`); that name picks the family here.
Adding a family is one file with a `DiffusionModel` subclass plus one line in `MODEL_CLASSES`.
"""

from __future__ import annotations

import importlib

from common.models.base import Cond, DiffusionModel, ModelLoadError

# pipeline class name -> "module:class" of its DiffusionModel (imported on use)
MODEL_CLASSES = {
    "StableDiffusionPipeline": "common.models.sd:StableDiffusion",
    "StableDiffusionXLPipeline": "common.models.sdxl:StableDiffusionXL",
}

__all__ = ["MODEL_CLASSES", "Cond", "DiffusionModel", "ModelLoadError", "model_class"]


def model_class(pipeline_class_name: str, where: str = "model.pretrained") -> type[DiffusionModel]:
    """The DiffusionModel subclass for a pipeline class name; one-line ModelLoadError if unsupported."""
    if pipeline_class_name not in MODEL_CLASSES:
        raise ModelLoadError(
            f"{where}: pipeline class {pipeline_class_name!r} is not supported; supported: {', '.join(MODEL_CLASSES)}"
        )
    module, name = MODEL_CLASSES[pipeline_class_name].split(":")
    return getattr(importlib.import_module(module), name)
