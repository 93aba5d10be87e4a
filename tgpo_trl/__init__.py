"""Teacher-Guided Policy Optimization (TGPO) for Hugging Face TRL."""

from .config import CHECKPOINTING_FIELD, GUIDANCE_MODES, TGPOConfig
from .trainer import TGPOTrainer


__version__ = "0.1.0"
__all__ = ["CHECKPOINTING_FIELD", "GUIDANCE_MODES", "TGPOConfig", "TGPOTrainer"]
