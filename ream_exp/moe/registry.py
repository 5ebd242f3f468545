"""The MoE model types of the installed transformers, read from its registry (never a list typed by hand).

A model type is MoE when its modeling file declares fused experts (`use_experts_implementation`, the
decorator transformers 5 puts on every experts module). Two kinds:

    causal_lm_moe_types()       model types AutoModelForCausalLM builds (text, or text beside a tower)
    vision_language_moe_types() image-text-to-text model types whose text model is MoE, not in the first list
"""

from __future__ import annotations

import functools
from pathlib import Path

_MARK = "use_experts_implementation"


@functools.lru_cache(maxsize=None)
def _moe_modules() -> frozenset[str]:
    """Module names (transformers.models.<name>) whose modeling files use fused experts."""
    import transformers

    root = Path(transformers.__file__).parent / "models"
    return frozenset(f.parent.name for f in root.glob("*/modeling_*.py") if _MARK in f.read_text(errors="ignore"))


def _module_of(model_type: str) -> str:
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    return model_type_to_module_name(model_type)


def causal_lm_moe_types() -> list[str]:
    """Every model type of AutoModelForCausalLM's registry whose model has fused experts."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return [mt for mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if _module_of(mt) in _moe_modules()]


def vision_language_moe_types() -> list[str]:
    """Image-text-to-text model types with fused experts that AutoModelForCausalLM does not list."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    return [mt for mt in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
            if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and _module_of(mt) in _moe_modules()]


def auto_model_class(config):
    """The Auto class that builds and loads `config`'s model with everything its checkpoint holds: a model
    type that AutoModelForImageTextToText knows (its config has a vision or audio tower) loads through it,
    towers kept; any other through AutoModelForCausalLM. (AutoModelForCausalLM would build some of them,
    Qwen3.5-MoE for one, as the text model alone, dropping the tower from the checkpoint.)"""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if type(config) in AutoModelForImageTextToText._model_mapping:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM
