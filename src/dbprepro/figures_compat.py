"""The old ``dbprepro.figures`` (both papers' figures in one module), which ``_compat`` maps here:
paper 1's figures now live in :mod:`dbprepro.paper1.figures`, paper 2's in
:mod:`dbprepro.paper2.figures`.  Only for old imports; import from the new modules instead."""

from .paper1.figures import (SETTING_COLOR, SETTING_LABEL, SETTING_ORDER, fig_attack_trajectories,  # noqa: F401
                             fig_loss_landscape, fig_rbgm, fig_robustness_bars, trajectory_plane)
from .paper2.figures import (P2_PAIR_COLOR, P2_PAIR_LABEL, fig_p2_compression_spectrum,  # noqa: F401
                             fig_p2_compression_vs_robustness, fig_p2_lp_distance, fig_p2_randomness)
