"""Paper 1's claims (arXiv 2404.14309) that a run's attack and clean records can test."""

from __future__ import annotations

from typing import Any

from . import stats
from .base import Claim, RunData, paired_runs

#: Paper 1's ablation orderings (DW-box): (variant compared with ADDT, statement, note)
ABLATIONS = (
    ("clean_finetune", "ADDT > clean fine-tuning: the adversarial part of ADDT adds robustness beyond "
                       "fine-tuning alone", ""),
    ("cgpo_mse", "ADDT > CGPO-MSE: the classifier guidance of CGPO matters", ""),
    ("addt_no_rbgm", "ADDT > ADDT w/o RBGM (Table 6)",
     "direction assumed: paper 1 keeps RBGM in ADDT; its Table 6 numbers are unconfirmed"),
)


def _label(defense: str, setting: str, attack: str = "pgd") -> str:
    names = {"dwbox": "DW-box", "whitebox_eot": "White-box-EoT", "whitebox": "White-box"}
    return f"{defense}: {attack} {names.get(setting, setting)} robust accuracy"


def paper1_claims(data: RunData, defenses: dict[str, dict[str, Any]], **kw: Any) -> list[Claim]:
    """Paper 1's claims the run's records can test.  ``defenses`` maps each defense to its
    ``sampler`` and ``finetune`` (None for the base network), as the typed experiment has them."""
    col = "correct_single"  # paper 1 reports the one-shot evaluation
    claims: list[Claim] = []
    threats = list(dict.fromkeys(data.records["threat"]))
    base_of = {d: next((b for b, s in defenses.items() if s["sampler"] == spec["sampler"] and s["finetune"] is None),
                       None)
               for d, spec in defenses.items() if spec["finetune"] == "addt"}
    for tm in threats:
        for d in defenses:
            if data.has(d, tm, "dwbox") and data.has(d, tm, "whitebox_eot"):
                claims.append(Claim(
                    f"p1_dwbox_stronger_{d}_{tm}", "P1", "DW-box vs White-box-EoT (Fig. 3, main table)",
                    f"DW-box < White-box-EoT: fixing the randomness makes the attack stronger ({d})",
                    _label(d, "dwbox"), _label(d, "whitebox_eot"), -1, tm,
                    paired_runs((d, tm, "dwbox", "pgd"), (d, tm, "whitebox_eot", "pgd"), col, **kw)))
        for setting in ("dwbox", "whitebox_eot"):
            for d, base in base_of.items():
                if base and data.has(d, tm, setting) and data.has(base, tm, setting):
                    claims.append(Claim(
                        f"p1_addt_gain_{d}_{setting}_{tm}", "P1", "ADDT (Fig. 6, main table)",
                        f"ADDT > vanilla under {'DW-box' if setting == 'dwbox' else 'White-box-EoT'} ({d} vs {base})",
                        _label(d, setting), _label(base, setting), +1, tm,
                        paired_runs((d, tm, setting, "pgd"), (base, tm, setting, "pgd"), col, **kw)))
        for variant, statement, note in ABLATIONS:
            if data.has("addt", tm, "dwbox") and data.has(variant, tm, "dwbox"):
                claims.append(Claim(
                    f"p1_ablation_{variant}_{tm}", "P1", "ADDT ablation (Table 6)", statement + " (DW-box)",
                    _label("addt", "dwbox"), _label(variant, "dwbox"), +1, tm,
                    paired_runs(("addt", tm, "dwbox", "pgd"), (variant, tm, "dwbox", "pgd"), col, **kw), note))
        if data.has("vanilla", tm, "whitebox_eot", "bpda") and data.has("vanilla", tm, "whitebox_eot"):
            claims.append(Claim(
                f"p1_exact_vs_bpda_{tm}", "P1", "exact gradients (Sec. 3)",
                "exact-gradient PGD-EoT is stronger than BPDA-EoT (vanilla)",
                _label("vanilla", "whitebox_eot"), _label("vanilla", "whitebox_eot", "bpda"), -1, tm,
                paired_runs(("vanilla", tm, "whitebox_eot", "pgd"), ("vanilla", tm, "whitebox_eot", "bpda"), col,
                            **kw)))
        aa = data.records[(data.records["defense"] == "vanilla") & (data.records["threat"] == tm)
                          & data.records["attack"].str.startswith("aa_")]
        for (setting, attack), _ in aa.groupby(["setting", "attack"], sort=False):
            ref = "dwbox" if setting == "dwbox" else "whitebox_eot"
            if data.has("vanilla", tm, ref):
                claims.append(Claim(
                    f"p1_{attack}_vs_pgd_{tm}", "P1", "AutoAttack protocols (Fixed-AutoAttack, Sec. 4)",
                    f"AutoAttack ({attack}, {setting}) is at least as strong as PGD ({ref}): lower robust accuracy",
                    _label("vanilla", setting, attack), _label("vanilla", ref), -1, tm,
                    paired_runs(("vanilla", tm, setting, attack), ("vanilla", tm, ref, "pgd"), col, **kw),
                    "AutoAttack's sub-attacks run with the config's reduced budgets (attacks.autoattack)"))
    present = set(data.clean["defense"]) if "defense" in data.clean else set()
    if {"addt", "addt_no_rbgm"} <= present:
        claims.append(Claim(
            "p1_rbgm_fidelity", "P1", "ADDT ablation (RBGM, Fig. 5)",
            "RBGM maintains fidelity: purified clean accuracy of ADDT > ADDT w/o RBGM",
            "addt: clean accuracy, fresh randomness (mean over draws)",
            "addt_no_rbgm: clean accuracy, fresh randomness (mean over draws)", +1, "none",
            _clean_pair("addt", "addt_no_rbgm", **kw)))
    return claims


def _clean_pair(a: str, b: str, **kw: Any):
    def compute(data: RunData, seed: int):
        c = data.clean[data.clean["setting"] == "random"]
        pa = c[c["defense"] == a].groupby("id")["correct"].mean()
        pb = c[c["defense"] == b].groupby("id")["correct"].mean()
        ids = pa.index.intersection(pb.index)
        va, vb = pa.loc[ids].to_numpy(float), pb.loc[ids].to_numpy(float)
        return stats.paired_values(va, vb, seed=seed, **kw), float(va.mean()), float(vb.mean())

    return compute
