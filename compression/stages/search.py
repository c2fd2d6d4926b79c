"""Stage 2a: Optuna search over the distillation hyperparameters (alpha, temperature, learning rate)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compression import checkpoint
from compression.data import Dataset
from compression.records import BEST_PARAMS_FILE, write_run

if TYPE_CHECKING:
    import optuna
    import torch

    from compression.pipeline import Context
    from compression.stages.distill import DistillConfig
    from compression.training import TrainConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Config:
    trials: int = dataclasses.field(default=4, metadata={"help": "Optuna budget (0 skips the search)"})
    trial_epochs: float = dataclasses.field(default=1.0, metadata={"help": "epochs per trial"})
    # In-scope training rows per trial; keeps the default search to minutes on 2 cores.
    trial_subset: int = dataclasses.field(default=4000, metadata={"help": "training rows per trial"})


def run(
    teacher_dir: Path, data: Dataset, out: Path, search: Config, base: DistillConfig, train_cfg: TrainConfig
) -> dict[str, Any]:
    import optuna

    from compression.stages.distill import train_student, val_score

    teacher, tokenizer, _ = checkpoint.load(teacher_dir)
    cache: dict[str, torch.Tensor] = {}

    def objective(trial: optuna.Trial) -> float:
        cfg = dataclasses.replace(
            base,
            alpha=trial.suggest_float("alpha", 0.1, 0.9),
            temperature=trial.suggest_float("temperature", 1.0, 8.0),
            train_subset=search.trial_subset,
            augment_copies=0,  # trials are a cheap proxy; augmentation only pays over full runs
            transfer_wiki=0,
            wiki_oos=min(base.wiki_oos, search.trial_subset // 4),
        )
        tcfg = dataclasses.replace(
            train_cfg, lr=trial.suggest_float("lr", 5e-5, 5e-4, log=True), epochs=search.trial_epochs
        )
        student, _ = train_student(teacher, tokenizer, data, cfg, tcfg, cache)
        value = val_score(student, tokenizer, data, tcfg.max_length)
        log.info("trial %d: %s -> %.4f", trial.number, trial.params, value)
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=train_cfg.seed))
    # Start from the chapter-like defaults so that even a budget of one trial is a sensible choice.
    study.enqueue_trial({"alpha": base.alpha, "temperature": base.temperature, "lr": train_cfg.lr})
    study.optimize(objective, n_trials=search.trials)
    result = {
        "best_params": study.best_params,
        "best_value": study.best_value,
        "trials": [{"number": t.number, "params": t.params, "value": t.value} for t in study.trials],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / BEST_PARAMS_FILE).write_text(json.dumps(study.best_params, indent=2) + "\n")
    config = {"search": dataclasses.asdict(search), "base": dataclasses.asdict(base), "train": train_cfg.as_dict()}
    write_run(out, "search", config, result)
    log.info("search best: %s", result["best_params"])
    return result


def run_stage(ctx: Context, cfg: Config) -> None:
    import shutil

    from compression.stages import distill

    if cfg.trials <= 0:
        shutil.rmtree(ctx.dir("search"), ignore_errors=True)  # distill then uses its own defaults
        return
    # The trials tune the distillation this run will do: its flags where given (with `all`), else its defaults.
    base, train = distill.resolve(ctx, ctx.config_of(distill.Config))
    run(ctx.dir("teacher"), ctx.dataset, ctx.dir("search"), cfg, base, train)
