"""Stages: the data split (rules of workflow/rules/data.smk).

Each function is the rule of the same name; it reads only the rule's ``input``, ``output``,
``params`` and ``wildcards``."""

from __future__ import annotations

from .run import stage


@stage
def prepare_data(input, output, params, wildcards) -> None:
    from ..data import prepare_split

    data = params.data
    prepare_split(data["dataset"], {"train": output.train, "test": output.test}, output.manifest,
                  test_fraction=data["test_fraction"], seed=data["split_seed"],
                  source_dir=input.get("source"))


@stage
def download_data(input, output, params, wildcards) -> None:
    from ..data.cifar10 import download_cifar10

    dl = params.download
    download_cifar10(output[0], dl["revision"], dl["files"], allow_unpinned=dl.get("allow_unpinned", False))
