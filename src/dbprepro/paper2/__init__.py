"""Paper 2 (arXiv 2505.22839): what the stochastic purifier does to images, and why it helps.

* :mod:`.distances`: claim 1, purification increases the l_p distance to the clean image.
* :mod:`.dominance`: claim 2, the purified image is dominated by the model's randomness.
* :mod:`.fixed_randomness`: claim 3, robustness under fixed randomness and the gain it keeps.
* :mod:`.compression`: claim 4, the compression rate under fixed randomness (and the Jacobian
  spectrum) as a gradient-free indicator of robustness.
* :mod:`.figures`: paper 2's figures; import it as ``dbprepro.paper2.figures`` (it is not loaded
  with this package, so the analysis stages do not load matplotlib).
"""

#: each exported name and its module, imported on first use: the analyses need torch, and the light stages
#: (tables, figures) that import this package's other modules do not (tests/test_light_stages.py)
_EXPORTS = {"compression_models_table": "compression_stats", "compression_rate": "compression",
            "compression_table": "compression_stats", "run_compression": "compression",
            "sample_perturbations": "compression", "run_lp_distances": "distances",
            "summarise_distances": "distances", "correlation_matrix": "dominance", "mean_off_diagonal": "dominance",
            "run_randomness": "dominance"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
