"""Factories that build or load the parts ACPOModule is given (YAML ``class_path`` targets)."""

from acpo_lightning.models.fingerprint import fingerprint_differences, vae_fingerprint
from acpo_lightning.models.loading import (
    ModelNotFoundError,
    load_scheduler,
    load_text_encoder,
    load_tokenizer,
    load_transformer,
    load_unet,
    load_vae,
    resolve_dtype,
)
from acpo_lightning.models.lora import (
    ATTENTION_PROJECTIONS,
    JOINT_ATTENTION_PROJECTIONS,
    LORA_WEIGHT_NAME,
    adapters_disabled,
    add_lora,
    has_lora,
    load_lora,
    lora_state_dict,
    save_lora,
)

__all__ = [
    "ATTENTION_PROJECTIONS",
    "JOINT_ATTENTION_PROJECTIONS",
    "LORA_WEIGHT_NAME",
    "ModelNotFoundError",
    "adapters_disabled",
    "add_lora",
    "fingerprint_differences",
    "has_lora",
    "load_lora",
    "load_scheduler",
    "load_text_encoder",
    "load_tokenizer",
    "load_transformer",
    "load_unet",
    "load_vae",
    "lora_state_dict",
    "resolve_dtype",
    "save_lora",
    "vae_fingerprint",
]
