"""The estimate: counted calls times measured seconds, as device-hours per job and per target."""

from __future__ import annotations

from typing import Any

from ..calls import KINDS
from .count import Job, count_calls
from .measure import measure_unit_costs


def estimate(jobs: list[Job], unit: dict[str, float]):
    """A DataFrame: one row per job with its calls and device-hours, then a ``TOTAL`` row.  A job
    on a family's own network (``Job.network``) prices its UNet calls with that network's unit
    costs (``unit["networks"][name]``)."""
    import pandas as pd

    rows = []
    for j in jobs:
        c = j.calls.as_dict()
        u = {**unit, **unit.get("networks", {}).get(j.network, {})} if j.network else unit
        seconds = sum(c[k] * float(u[k]) for k in KINDS)
        rows.append({"job": j.job, "target": j.target, **{f"calls_{k}": c[k] for k in KINDS},
                     "device_hours": seconds / 3600.0, "upper_bound": j.upper_bound, "note": j.note})
    df = pd.DataFrame(rows)
    total = {"job": "TOTAL", "target": "all", **{f"calls_{k}": df[f"calls_{k}"].sum() for k in KINDS},
             "device_hours": df["device_hours"].sum(), "upper_bound": bool(df["upper_bound"].any()),
             "note": "sum of the rows"}
    return pd.concat([df, pd.DataFrame([total])], ignore_index=True)


def by_target(df):
    """Device-hours summed per target (the table or figure each job mainly feeds)."""
    body = df[df["job"] != "TOTAL"]
    return body.groupby("target", sort=False)["device_hours"].sum().reset_index()


def format_report(df, unit: dict[str, Any], config_name: str) -> str:
    meta = unit["meta"]
    lines = [f"dbprepro cost estimate for config {config_name!r}",
             f"measured on {meta['device']} (torch {meta['torch']}, batch {meta['batch_size']}, "
             f"best of {meta['repeats']}; {meta['clock']}; load average {meta['load_average']:.1f})",
             f"  UNet: {meta['unet']}", f"  classifier: {meta['classifier']}",
             *[f"  family network: {n['name']}: UNet calls " + ", ".join(f"{k} {n[k]:.3g}" for k in ("unet_fwd", "unet_grad"))
               + " s per image" for n in unit.get("networks", {}).values()],
             f"  purification chain: {int(df.attrs.get('chain_steps', 0)) or '?'} UNet steps per purification",
             "seconds per image: " + ", ".join(f"{k} {unit[k]:.3g}" for k in KINDS),
             "GPU throughput differs: run this command on the node that will run the DAG.", ""]
    w = max(len(j) for j in df["job"])
    lines.append(f"{'job':<{w}}  {'device-hours':>12}  {'UNet calls':>12}  note")
    for _, r in df.iterrows():
        unet_calls = r["calls_unet_fwd"] + r["calls_unet_grad"] + r["calls_unet_train"]
        mark = " (upper bound)" if r["upper_bound"] and r["job"] != "TOTAL" else ""
        lines.append(f"{r['job']:<{w}}  {r['device_hours']:>12.2f}  {unet_calls:>12.3g}  {r['note']}{mark}")
    lines += ["", "per target:"]
    for _, r in by_target(df).iterrows():
        lines.append(f"  {r['target']:<44} {r['device_hours']:>12.2f} h")
    return "\n".join(lines)


def run_estimate(cfg: dict, device=None, batch_size: int | None = None, repeats: int = 3, csv: str | None = None,
                 threads: int | None = 1, target_seconds: float = 60.0) -> str:
    """Count, measure (with a progress bar on stderr), combine; optionally write the per-job CSV.
    Returns the printed report."""
    jobs = count_calls(cfg)
    unit = measure_unit_costs(cfg, device=device, batch_size=batch_size, repeats=repeats, threads=threads,
                              target_seconds=target_seconds)
    df = estimate(jobs, unit)
    df.attrs["chain_steps"] = jobs[0].extra["chain_steps"] if jobs else 0
    if csv:
        from pathlib import Path

        out = df.copy()
        out["measured_on"] = unit["meta"]["device"]
        for k in KINDS:
            out[f"seconds_per_{k}"] = unit[k]
        Path(csv).parent.mkdir(parents=True, exist_ok=True)
        out.to_csv(csv, index=False)
    return format_report(df, unit, cfg.get("name", "?"))
