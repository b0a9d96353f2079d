"""Stages: the papers' numbers beside the reproduced ones and the claims table (rules of workflow/rules/report.smk).

Each function is the rule of the same name; it reads only the rule's ``input``, ``output``,
``params`` and ``wildcards``."""

from __future__ import annotations

from pathlib import Path

from .run import stage


@stage
def paper_vs_reproduced(input, output, params, wildcards) -> None:
    from ..reference import write_paper_vs_reproduced

    # the reproduced values come from the rule's input tables (results/tables), read where they are, not
    # beside the output, so the job reads only what Snakemake gave it
    write_paper_vs_reproduced(str(Path(input[0]).parent), output.csv, output.md, params.dataset, params.name)


@stage
def table_claims(input, output, params, wildcards) -> None:
    from ..claims import write_claims_table

    c = params.claims
    p2 = {name: input[name] for name in ("p2_lp_distances", "p2_randomness", "p2_compression",
                                          "p2_compression_models") if name in input.keys()}
    write_claims_table(list(input.records), list(input.clean), p2, output.csv, output.md,
                       defenses=dict(params.defenses), threat=params.threat,
                       fixed_settings=list(params.fixed_settings), n_images=params.n_images,
                       evaluation=params.evaluation, alpha=c["alpha"], power=c["power"],
                       confidence=params.confidence, resamples=c["resamples"], seed=params.seed)
