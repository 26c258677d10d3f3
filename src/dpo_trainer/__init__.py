"""Direct Preference Optimization (Rafailov et al., NeurIPS 2023, arXiv 2305.18290) for the Hugging Face stack."""

from ._version import __version__
from .config import DPOConfig
from .trainer import DPOTrainer

__all__ = ["DPOConfig", "DPOTrainer", "__version__"]
