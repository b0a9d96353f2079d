"""Paper 2 (arXiv 2505.22839): what the stochastic purifier does to images, and why it helps.

* :mod:`.distances`: claim 1, purification increases the l_p distance to the clean image.
* :mod:`.dominance`: claim 2, the purified image is dominated by the model's randomness.
* :mod:`.fixed_randomness`: claim 3, robustness under fixed randomness and the gain it keeps.
* :mod:`.compression`: claim 4, the compression rate under fixed randomness (and the Jacobian
  spectrum) as a gradient-free indicator of robustness.
* :mod:`.figures`: paper 2's figures; import it as ``dbprepro.paper2.figures`` (it is not loaded
  with this package, so the analysis stages do not load matplotlib).
"""

from .compression import (compression_models_table, compression_rate, compression_table, run_compression,
                          sample_perturbations)
from .distances import run_lp_distances, summarise_distances
from .dominance import correlation_matrix, mean_off_diagonal, run_randomness

__all__ = ["compression_models_table", "compression_rate", "compression_table", "correlation_matrix",
           "mean_off_diagonal", "run_compression", "run_lp_distances", "run_randomness", "sample_perturbations",
           "summarise_distances"]
