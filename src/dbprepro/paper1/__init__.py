"""Paper 1 (Liu et al., ICLR 2025, arXiv 2404.14309): attacks on the stochastic purifier, ADDT's tables.

* :mod:`.tables`: paper 1's tables from the attack records (main, ADDT training, ablation, families).
* :mod:`.landscape`: loss landscapes of the defended classifier around an image under a fixed
  randomness configuration, with both attack paths (Fig. 2).
* :mod:`.figures`: paper 1's figures (attack trajectories, loss landscape, robustness bars, RBGM);
  import it as ``dbprepro.paper1.figures`` (it is not loaded with this package, so the analysis
  stages do not load matplotlib).
* :mod:`.waterfall`: the robustness waterfall - each defense's robust accuracy against every attack
  so far, per image, from the weakest attack to the strongest (stage order
  :data:`~.waterfall.STAGE_ORDER`), ending at its robust accuracy against all attacks, beside the
  strongest single run; :mod:`.waterfall_figure` draws it.
"""

__all__ = ["compute_landscapes", "grid_axis", "landscape_for_image", "loss_landscape", "plane_directions"]


def __getattr__(name: str):
    """The landscape functions, imported on first use: :mod:`.landscape` needs torch, and the light stages
    (tables, figures) that import this package's other modules do not (tests/test_light_stages.py)."""
    if name in __all__:
        from . import landscape

        return getattr(landscape, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
