"""The stages of the Snakemake DAG: one module per rule file, one function per rule.

A rule ``R`` in ``workflow/rules/<file>.smk`` runs the function ``R`` of
``dbprepro/pipeline/<file>.py`` (tested): heavy rules through ``run_heavy_stage`` (a warm worker
process in a local run, :mod:`~dbprepro.pipeline.workers`; the job's own process on a cluster), light
ones (merges, tables, figures) in Snakemake's process (:func:`run_stage_inline`).  Each stage is a thin adapter from the rule's ``input`` /
``output`` / ``params`` to the concept packages (data, models, purifiers, attacks, addt, paper1,
paper2); ``run.py`` holds what happens around every stage (logging, provenance, temporaries).
"""

from . import attacks, data, evaluate, figures, models, paper2, replicates, report, reproduce, sanity, tables  # noqa: F401 - fill STAGES
from .attacks import attack, merge_attack  # noqa: F401
from .data import download_data, prepare_data  # noqa: F401
from .evaluate import evaluate_clean, gradient_modes  # noqa: F401
from .figures import (figure_p1_fig1_attack_trajectories, figure_p1_fig2_loss_landscape,  # noqa: F401
                      figure_p1_fig3_robustness_bars, figure_p1_fig5_rbgm, loss_landscape, rbgm_samples)
from .models import (download_classifier, download_diffusion, train_addt, train_classifier,  # noqa: F401
                     train_diffusion)
from .paper2 import (figure_p2_fig1_lp_distance, figure_p2_fig2_randomness_correlation,  # noqa: F401
                     figure_p2_fig5_compression_spectrum, figure_p2_fig6_compression_vs_robustness, p2_compression,
                     p2_lp_distances, p2_randomness, table_p2_compression, table_p2_compression_models,
                     table_p2_fixed_randomness)
from .replicates import table_claims_replicates  # noqa: F401
from .report import paper_vs_reproduced, table_claims  # noqa: F401
from .reproduce import compare_runs  # noqa: F401
from .sanity import figure_sanity, table_sanity  # noqa: F401
from .run import STAGES, log, run_stage, run_stage_inline, stage, stage_device, stage_name  # noqa: F401
from .tables import (table_addt_training, table_clean_accuracy, table_p1_ablation, table_p1_families,  # noqa: F401
                     table_p1_main)
