"""Stage: the claims across replicate training seeds (rule of workflow/rules/replicates.smk).

The function is the rule of the same name; it reads only the rule's ``input``, ``output`` and
``params``."""

from __future__ import annotations

from .run import stage


@stage
def table_claims_replicates(input, output, params, wildcards) -> None:
    from ..claims.replicates import write_claims_replicates

    write_claims_replicates(dict(zip(params.seeds, input.claims, strict=True)), output.csv, output.md,
                            alpha=params.alpha, confidence=params.confidence)
