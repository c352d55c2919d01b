"""Model classes and the registry of model kinds (`architecture` in config.json -> classes)."""
from llmkit.models.decoder import DecoderLM
from llmkit.models.kinds import (MODEL_KINDS, ModelKind, build_model, config_from_dict, config_to_dict, kind_of,
                                 kind_of_config, kind_of_model, load_config, register_kind, save_config)

__all__ = ["DecoderLM", "MODEL_KINDS", "ModelKind", "build_model", "config_from_dict", "config_to_dict", "kind_of",
           "kind_of_config", "kind_of_model", "load_config", "register_kind", "save_config"]
