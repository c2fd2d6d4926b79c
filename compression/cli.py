"""`python -m compression STAGE ...`: each stage alone from the previous stage's artifact, or `all`.

Stages read and write under --artifacts: teacher/ -> search/ -> student/ -> pruned/ -> onnx/ -> int8/,
then `artifact` writes the served model to --model-dir and `bench` writes reports/.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from compression import data as data_mod
from compression.errors import FactoryError
from compression.metrics import bar_shortfalls
from compression.training import TrainConfig

log = logging.getLogger("compression")
STAGES = ("teacher", "search", "distill", "prune", "export", "quantize", "artifact", "bench")


def _options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("paths")
    g.add_argument("--data", type=Path, default=data_mod.DEFAULT_DATA, help="CLINC150 JSON file (original format)")
    g.add_argument("--wiki", default=str(data_mod.DEFAULT_WIKI), help="Wikipedia sentences used as extra oos")
    g.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="where stages read and write")
    g.add_argument("--model-dir", type=Path, default=Path("models/clinc150"), help="the served artifact")
    g.add_argument("--reports", type=Path, default=Path("reports"))
    g = p.add_argument_group("training (all stages)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--max-length", type=int, default=64, help="token window, also the served truncation")
    g.add_argument("--wiki-oos", type=int, default=2000, help="Wikipedia sentences added as oos examples")
    g.add_argument("--train-subset", type=int, default=0, help="use only N training rows (0: all)")
    g = p.add_argument_group("teacher")
    g.add_argument("--pretrained", default=None, help="local path or hub id (default: the all-MiniLM-L6-v2 package)")
    g.add_argument("--teacher-epochs", type=float, default=7)
    g.add_argument("--teacher-lr", type=float, default=1e-4)
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g = p.add_argument_group("distillation and search")
    g.add_argument("--student-layers", default="0,2,4", help="teacher layers that seed the student")
    g.add_argument("--student-epochs", type=float, default=6)
    g.add_argument("--student-lr", type=float, default=None, help="default: the search's best, else 2e-4")
    g.add_argument("--alpha", type=float, default=None, help="default: the search's best, else 0.5")
    g.add_argument("--temperature", type=float, default=None, help="default: the search's best, else 4")
    g.add_argument("--hidden-weight", type=float, default=0.0, help="hidden-state transfer loss weight")
    g.add_argument("--augment-copies", type=int, default=2, help="perturbed copies per query, teacher-labelled")
    g.add_argument(
        "--train-embeddings", action="store_true", help="also train the student's word embeddings (default: frozen)"
    )
    g.add_argument("--trials", type=int, default=4, help="Optuna budget (0 skips the search)")
    g.add_argument("--trial-epochs", type=float, default=1.0)
    g.add_argument("--trial-subset", type=int, default=4000)
    g = p.add_argument_group("pruning, quantisation, benchmark")
    g.add_argument("--ffn-keep", type=float, default=0.75, help="share of FFN neurons kept (1.0: no pruning)")
    g.add_argument("--recover-epochs", type=float, default=7.0, help="distillation epochs after pruning")
    g.add_argument("--recover-lr", type=float, default=1.5e-4)
    g.add_argument("--recover-copies", type=int, default=3, help="fresh perturbed copies per query for recovery")
    g.add_argument(
        "--recover-from-student", action="store_true", help="recover from the unpruned student, not the teacher"
    )
    g.add_argument("--latency-queries", type=int, default=300)
    g.add_argument("--no-baseline", action="store_true", help="skip timing the BERT-base pipeline baseline")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m compression", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("data", help="download the original CLINC150 file (needs the internet)")
    p.add_argument("--dest", type=Path, default=Path("data/clinc150/data_oos_plus.json"))
    options = _options()
    for stage in (*STAGES, "all"):
        sub.add_parser(stage, parents=[options], help=f"run the {stage} stage" if stage != "all" else "every stage")
    return parser


def _train(a: argparse.Namespace, epochs: float, lr: float, label_smoothing: float = 0.0) -> TrainConfig:
    return TrainConfig(
        epochs=epochs,
        lr=lr,
        batch_size=a.batch_size,
        label_smoothing=label_smoothing,
        max_length=a.max_length,
        seed=a.seed,
        threads=a.threads,
    )


def _layers(spec: str) -> list[int]:
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise FactoryError(f"--student-layers must be comma-separated integers, got '{spec}'") from None


class Factory:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.dirs = {s: a.artifacts / s for s in ("teacher", "search", "student", "pruned", "onnx", "int8")}
        self.clinc = data_mod.load_clinc(a.data)

    def teacher(self) -> None:
        from compression import teacher

        a = self.a
        cfg = teacher.TeacherConfig(a.pretrained, a.wiki, a.wiki_oos, a.train_subset)
        teacher.run(self.clinc, self.dirs["teacher"], cfg, _train(a, a.teacher_epochs, a.teacher_lr, a.label_smoothing))

    def _distill_config(self) -> tuple[object, TrainConfig]:
        from compression.distill import DistillConfig
        from compression.search import load_best

        a = self.a
        best = load_best(self.dirs["search"])
        cfg = DistillConfig(
            alpha=a.alpha if a.alpha is not None else best.get("alpha", 0.5),
            temperature=a.temperature if a.temperature is not None else best.get("temperature", 4.0),
            hidden_weight=a.hidden_weight,
            layers=_layers(a.student_layers),
            wiki_path=a.wiki,
            wiki_oos=a.wiki_oos,
            train_subset=a.train_subset,
            augment_copies=a.augment_copies,
            freeze_embeddings=not a.train_embeddings,
        )
        lr = a.student_lr if a.student_lr is not None else best.get("lr", 2e-4)
        return cfg, _train(a, a.student_epochs, lr)

    def search(self) -> None:
        from compression import search

        if self.a.trials <= 0:
            shutil.rmtree(self.dirs["search"], ignore_errors=True)
            return
        base, tcfg = self._distill_config()
        scfg = search.SearchConfig(self.a.trials, self.a.trial_epochs, self.a.trial_subset)
        search.run(self.dirs["teacher"], self.clinc, self.dirs["search"], scfg, base, tcfg)  # type: ignore[arg-type]

    def distill(self) -> None:
        from compression import distill

        cfg, tcfg = self._distill_config()
        distill.run(self.dirs["teacher"], self.clinc, self.dirs["student"], cfg, tcfg)  # type: ignore[arg-type]

    def prune(self) -> None:
        from compression import prune

        a = self.a
        if a.ffn_keep >= 1.0:
            # No pruning asked for: the stage passes the student through, so later stages have one input.
            shutil.rmtree(self.dirs["pruned"], ignore_errors=True)
            shutil.copytree(self.dirs["student"], self.dirs["pruned"])
            return
        kd, _ = self._distill_config()
        cfg = prune.PruneConfig(
            a.ffn_keep,
            a.recover_epochs,
            a.wiki,
            a.wiki_oos,
            a.train_subset,
            augment_copies=a.recover_copies,
            alpha=kd.alpha,  # type: ignore[attr-defined]
            temperature=kd.temperature,  # type: ignore[attr-defined]
        )
        teacher = None if a.recover_from_student else self.dirs["teacher"]
        tcfg = _train(a, a.recover_epochs, a.recover_lr)
        prune.run(self.dirs["student"], self.clinc, self.dirs["pruned"], cfg, tcfg, teacher_dir=teacher)

    def export(self) -> None:
        from compression import export

        export.run(self.dirs["pruned"], self.clinc, self.dirs["onnx"], self.a.max_length)

    def quantize(self) -> None:
        from compression import quantize

        quantize.run(self.dirs["onnx"], self.clinc, self.dirs["int8"], seed=self.a.seed)

    def artifact(self) -> None:
        from compression import artifact

        stage_dirs = {k: v for k, v in self.dirs.items() if k != "search"}
        artifact.write(self.dirs["int8"], self.a.model_dir, stage_dirs, self.a.seed, self.a.max_length)

    def bench(self) -> None:
        from compression import benchmark

        a = self.a
        stages: list[tuple[str, str, Path]] = [
            ("teacher", "torch", self.dirs["teacher"]),
            ("distilled student", "torch", self.dirs["student"]),
        ]
        if a.ffn_keep < 1.0 or (self.dirs["pruned"] / "run.json").is_file():
            stages.append(("FFN-pruned student", "torch", self.dirs["pruned"]))
        stages += [
            ("ONNX + ORT fusions", "onnx-fp32", self.dirs["onnx"]),
            ("int8 quantized", "onnx-int8", self.dirs["int8"]),
            ("served (models/clinc150)", "served", a.model_dir),
        ]
        stages = [s for s in stages if s[2].exists()]
        cfg = benchmark.BenchConfig(latency_queries=a.latency_queries, seed=1, baseline=not a.no_baseline)
        rows = benchmark.run(stages, self.clinc, a.reports, cfg, self.dirs["teacher"])
        served = next((r for r in rows if r["runtime"] == "ORT int8" and r["stage"].startswith("served")), None)
        if served is not None and (a.model_dir / "card.json").is_file():
            _store_benchmark_row(a.model_dir, served)
        print(benchmark.markdown(rows))
        if served is not None:
            print(_bar_verdict(served, a.model_dir))


def _bar_verdict(served: dict[str, object], model_dir: Path) -> str:
    """Training is noisy near the bar, so a rebuild says plainly whether it cleared it."""
    missed = bar_shortfalls(served)
    if not missed:
        return f"{model_dir} meets the accuracy bar (in-scope, OOS recall, test-weighted) on validation."
    return (
        f"warning: {model_dir} is below the accuracy bar on validation: {'; '.join(missed)}. "
        f"`git checkout -- {model_dir}` restores the committed model."
    )


def _store_benchmark_row(model_dir: Path, row: dict[str, object]) -> None:
    """The card carries its benchmark row; card.json is not hashed, so the artifact stays valid."""
    card_path = model_dir / "card.json"
    card = json.loads(card_path.read_text())
    card["benchmark"] = row
    card_path.write_text(json.dumps(card, indent=2) + "\n")


def run_stage(a: argparse.Namespace) -> None:
    if a.stage == "data":
        print(f"downloaded and verified {data_mod.download(a.dest)}")
        return
    factory = Factory(a)
    for stage in STAGES if a.stage == "all" else (a.stage,):
        started = time.perf_counter()
        log.info("stage %s: start", stage)
        getattr(factory, stage)()
        log.info("stage %s: done in %.0f s", stage, time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    try:
        run_stage(args)
    except FactoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
