"""What a sweep trains: `Job` (one training run and what the tables need to know about it) and
`train_config`, the `vitrepro.train.TrainConfig` dict the notebooks build their jobs from."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Sequence


@dataclass
class Job:
    """One training run of a sweep, plus what the tables need to know about it."""

    config: dict
    stage: str  # "pretrain" | "finetune" | "scratch"
    upstream: str | None = None
    upstream_examples: int | None = None
    parent: "Job | None" = None  # the pre-training job a fine-tune starts from


def finetune_from(record: dict) -> str:
    """The `init` of a fine-tuning config: the stored final weights of the parent run (its ``record``)."""
    return f"run:{record['experiment']}/{record['run_id']}"


def train_config(*, fewshot_dataset: str | None = None, fewshot_shots: Sequence[int] = (5,),
                 augment: bool | str = False, **fields) -> dict:
    """A `vitrepro.train.TrainConfig` dict: test accuracy, plus the few-shot probe (seeds 0-2) where asked."""
    evaluators = [{"type": "accuracy"}]
    if fewshot_dataset:
        evaluators.append({"type": "fewshot", "dataset": fewshot_dataset, "shots": list(fewshot_shots),
                           "seeds": [0, 1, 2]})
    return {"log_every": 50, **fields, "evaluators": evaluators,
            "augment": {True: "crop_flip", False: "none"}.get(augment, augment)}


def unique(jobs: Sequence[Job]) -> list[Job]:
    """``jobs`` with each training run once: two jobs are the same run when their configurations and their
    parents' (recursively) are equal, as in the run store. A duplicate fine-tune's parent becomes the kept
    job, so the union of several notebooks' sweeps is one sweep (`run_all` trains a profile that way)."""
    kept: dict[str, Job] = {}

    def key(j: Job) -> str:
        return json.dumps([j.config, key(j.parent) if j.parent is not None else None], sort_keys=True, default=str)

    def keep(j: Job) -> Job:
        k = key(j)
        if k not in kept:
            parent = keep(j.parent) if j.parent is not None else None
            kept[k] = j if parent is j.parent else dataclasses.replace(j, parent=parent)
        return kept[k]

    for j in jobs:
        keep(j)
    return list(kept.values())
