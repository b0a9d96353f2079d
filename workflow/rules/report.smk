# Each rule below runs the function of its name in src/dbprepro/pipeline/report.py.
# Stage 7: the papers' numbers beside the reproduced ones (src/dbprepro/reference/paper_numbers.csv).
# The values come from tables other rules wrote; on the digits default they are digits values
# (column `dataset`), not CIFAR-10.  Runs in the Snakemake process (a join of small CSVs).


from dbprepro.reference import PAPER_NUMBERS


rule paper_vs_reproduced:
    input:
        paper_vs_reproduced_inputs(),
        reference=str(PAPER_NUMBERS),
    output:
        csv=report(
            f"{RESULTS}/tables/paper_vs_reproduced.csv",
            caption="../report/paper_vs_reproduced.rst",
            category="Overview",
            subcategory="Paper vs reproduced",
            labels={"result": "Paper values beside reproduced values"},
        ),
        md=f"{RESULTS}/tables/paper_vs_reproduced.md",
    params:
        dataset=config["data"]["dataset"],
        name=config["name"],
    log:
        f"{LOGS}/paper_vs_reproduced.log",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)
