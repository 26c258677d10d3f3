"""Direct Preference Optimization (Rafailov et al., NeurIPS 2023, arXiv 2305.18290) for the Hugging Face stack."""

__version__ = "0.1.0"

from .config import DPOConfig  # noqa: E402
from .trainer import DPOTrainer  # noqa: E402

__all__ = ["DPOConfig", "DPOTrainer", "__version__"]
