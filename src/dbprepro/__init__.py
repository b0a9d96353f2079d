"""dbprepro: reproducibility package for diffusion-based adversarial purification."""
from . import _compat

__version__ = "0.1.0"
_compat.install()
