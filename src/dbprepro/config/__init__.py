"""Configuration: the schema and its validation (``validate.py``) and the typed experiment built
from a validated config (``experiment.py``: defenses, their purification, the attack grid).

The schema (``dbprepro/schemas/config.schema.yaml``) documents every key.  Snakemake
(``workflow/rules/common.smk``) and the CLI both call :func:`validate_config`; every failure is a
:class:`ConfigError` naming the key.
"""

from ..errors import ConfigError
from .experiment import (UNDEFENDED, AttackRun, Defense, Experiment, addt_settings, analysis_threat, attack_runs,
                         defense_attacks, defense_family, defense_purification, defense_weights, family_defenses,
                         fixed_setting_name, own_addt_defenses, threat_model)
from .validate import (SCHEMA_PATH, check_dag_config, deep_merge, load_config, load_configs, load_yaml,
                       unpinned_entries, validate_config)

__all__ = ["SCHEMA_PATH", "UNDEFENDED", "AttackRun", "ConfigError", "Defense", "Experiment", "addt_settings",
           "analysis_threat", "attack_runs", "check_dag_config", "deep_merge", "defense_attacks", "defense_family", "defense_purification",
           "defense_weights", "family_defenses", "fixed_setting_name", "load_config", "load_configs", "load_yaml",
           "own_addt_defenses", "threat_model", "unpinned_entries", "validate_config"]
