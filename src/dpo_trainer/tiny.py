"""Deprecated: moved to `dpo_trainer.testing` (this path goes away in the next release).

Importing it warns; its names are `dpo_trainer.testing.tiny`'s own objects.
"""

import warnings

from dpo_trainer.testing import tiny as _moved

warnings.warn("dpo_trainer.tiny is deprecated, import from dpo_trainer.testing", FutureWarning, stacklevel=2)
__all__ = list(_moved.__all__)
globals().update({name: getattr(_moved, name) for name in __all__})
