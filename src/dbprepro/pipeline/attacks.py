"""Stages: attack shards and their merge (rules of workflow/rules/attacks.smk).

Each function is the rule of the same name; it reads only the rule's ``input``, ``output``,
``params`` and ``wildcards``."""

from __future__ import annotations

from .run import stage_device, stage


@stage
def attack(input, output, params, wildcards) -> None:
    from ..attacks.runner import run_attack_shard

    run_attack_shard(input.classifier, input.get("diffusion"), input.test, input.manifest,
                     records=output.records, trace=output.trace, paths=output.paths, adv=output.adv,
                     defense=wildcards.defense, threat=wildcards.threat, setting=wildcards.setting,
                     attack=wildcards.attack, shard=int(wildcards.shard), attacks=params.attacks,
                     purification=params.purification, variance_type=params.variance_type,
                     seed=params.seed, device=stage_device(params))


@stage
def merge_attack(input, output, params, wildcards) -> None:
    from ..shards import merge_shards

    merge_shards(list(input.records), list(input.trace), list(input.paths), output.records, output.trace,
                 output.paths, list(input.adv), output.adv)
