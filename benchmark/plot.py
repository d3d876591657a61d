"""Learning curves (mean and spread over seeds) and a table of final values per group of runs.

    python benchmark/plot.py runs/benchmark/default__1e8dbb8 --out docs/images/default_sweep.png
    python benchmark/plot.py runs/benchmark/default__<c> runs/benchmark/adam_pytorch__<c> --seeds 1 2 3 \\
        --out docs/images/adam_ablation.png

Each positional folder is one group (its name is the label) holding run folders; a run is any folder with a
metrics.jsonl (train_both.py runs have policy/ and reward/ stages, read together; the reward stage's held-out
accuracy is drawn against labels seen, in the last panel). Run folders are named <exp>__<seed>__<time>; --seeds
keeps those seeds only. A .csv exported from wandb (columns: a run name column `run` or `Name`, `episode`, metric
names) is a group of its own. Curves are drawn against episodes. The table gives, per group, the mean and std over
seeds of each run's last tenth of updates (and of approxkl and clipfrac at the first update, where an optimizer's
first steps show), and a verdict for every pair of groups whose means differ by more than the sum of their stds.
"""

import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import tyro  # noqa: E402

POLICY_METRICS = [
    "objective/scores", "objective/gold_score", "objective/kl", "objective/kl_coef", "objective/entropy",
    "ppo/loss/policy", "ppo/loss/value", "ppo/policy/approxkl", "ppo/policy/clipfrac", "ppo/val/error",
]
FINAL_METRICS = ["reward/test_accuracy", "objective/gold_score", "objective/scores", "objective/kl",
                 "throughput/episodes_per_s"]
FIRST_METRICS = ["ppo/policy/approxkl", "ppo/policy/clipfrac"]  # the size of the first PPO steps (e.g. Adam's epsilon)


@dataclass
class Args:
    groups: tyro.conf.Positional[List[str]]
    """folders of run folders (one group each), or wandb .csv exports"""
    out: str = "benchmark/curves.png"
    """PNG to write"""
    metrics: List[str] = field(default_factory=lambda: list(POLICY_METRICS))
    """policy metrics to draw against episodes"""
    seeds: Optional[List[int]] = None
    """only the runs of these seeds (default: every run of each group)"""


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in open(path) if line.strip()]


def load_run(run_dir: Path) -> dict:
    """{'curve': [policy metrics per update], 'reward_curve': [held-out accuracy evaluations], 'final': {...}}."""
    policy = run_dir / "metrics.jsonl"
    if not policy.is_file():
        policy = run_dir / "policy" / "metrics.jsonl"
    curve = [m for m in read_jsonl(policy) if "episode" in m] if policy.is_file() else []
    final, reward_curve = {}, []
    reward = run_dir / "reward" / "metrics.jsonl"
    if reward.is_file():
        reward_curve = [m for m in read_jsonl(reward) if "test/accuracy" in m]  # before, during and after training
        if reward_curve:
            final["reward/test_accuracy"] = reward_curve[-1]["test/accuracy"]
    if curve:
        tail = curve[-max(1, len(curve) // 10) :]
        for k in FINAL_METRICS[1:]:
            if k in tail[0]:
                final[k] = statistics.mean(m[k] for m in tail)
        for k in FIRST_METRICS:
            if k in curve[0]:
                final[f"{k} @update 1"] = curve[0][k]
    return {"curve": curve, "reward_curve": reward_curve, "final": final}


def load_group(path: str, seeds: Optional[List[int]] = None) -> tuple:
    p = Path(path)
    if p.suffix == ".csv":
        runs = {}
        with open(p) as f:
            for row in csv.DictReader(f):
                name = row.get("run") or row.get("Name") or "run"
                runs.setdefault(name,
                                []).append({k: float(v) for k,
                                            v in row.items() if v not in ("", None) and k not in ("run", "Name")})
        return p.stem, [{"curve": c, "reward_curve": [], "final": {}} for c in runs.values()]
    if not p.is_dir():
        print(f"error: {path}: no such folder or .csv file", file=sys.stderr)
        sys.exit(2)
    runs = sorted(d for d in p.iterdir() if d.is_dir() and ((d / "metrics.jsonl").is_file()
                                                            or (d / "policy" / "metrics.jsonl").is_file()))
    if seeds is not None:
        runs = [d for d in runs if len(d.name.split("__")) >= 3 and d.name.split("__")[-2] in {str(x) for x in seeds}]
    if not runs:
        print(f"error: {path}: no run folders with a metrics.jsonl" + (f" for seeds {seeds}" if seeds else ""),
              file=sys.stderr)
        sys.exit(2)
    return p.name, [load_run(d) for d in runs]


def mean_std(values: list) -> tuple:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def draw(ax, name: str, curves: list, x_key: str, metric: str):
    """Mean and mean +- std over seeds of `metric` against `x_key` (runs of one group share their x grid)."""
    n = min(len(c) for c in curves)
    x = [curves[0][i][x_key] for i in range(n)]
    stats = [mean_std([c[i][metric] for c in curves]) for i in range(n)]
    ax.plot(x, [m for m, _ in stats], label=f"{name} ({len(curves)} seeds)")
    ax.fill_between(x, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.25)


def plot(groups: list, metrics: list, out: str):
    with_reward = any(r["reward_curve"] for _, runs in groups for r in runs)
    panels = metrics + (["reward/test_accuracy"] if with_reward else [])
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, panels):
        for name, runs in groups:
            if metric == "reward/test_accuracy":
                curves = [r["reward_curve"] for r in runs if r["reward_curve"]]
                if curves:
                    draw(ax, name, curves, "label", "test/accuracy")
                continue
            curves = [r["curve"] for r in runs if r["curve"] and metric in r["curve"][0]]
            if curves:
                draw(ax, name, curves, "episode", metric)
        ax.set_title("reward model: held-out accuracy" if metric == "reward/test_accuracy" else metric, fontsize=10)
        ax.set_xlabel("labels seen" if metric == "reward/test_accuracy" else "episodes", fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def table(groups: list) -> list:
    """Rows of (group, metric, mean, std, n) and the verdict lines."""
    finals = {}
    metrics = FINAL_METRICS + [f"{k} @update 1" for k in FIRST_METRICS]
    for name, runs in groups:
        for metric in metrics:
            values = [r["final"][metric] for r in runs if metric in r["final"]]
            if values:
                finals[(name, metric)] = (*mean_std(values), len(values))
    print(f"{'group':32s} {'metric (last tenth, or @update 1)':36s} {'mean':>9s} {'std':>8s} {'seeds':>5s}")
    for (name, metric), (m, s, n) in finals.items():
        print(f"{name:32s} {metric:36s} {m:9.4f} {s:8.4f} {n:5d}")
    verdicts = []
    names = [name for name, _ in groups]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for metric in metrics:
                if (a, metric) in finals and (b, metric) in finals:
                    (ma, sa, na), (mb, sb, nb) = finals[(a, metric)], finals[(b, metric)]
                    if min(na, nb) < 2:
                        verdict = "too few seeds to judge"
                    elif abs(ma - mb) > sa + sb:
                        verdict = "DIFFERENT (gap larger than the summed seed stds)"
                    else:
                        verdict = "same within the seed spread"
                    verdicts.append(f"{metric}: {a} {ma:.4f} vs {b} {mb:.4f}: {verdict}")
    for v in verdicts:
        print(v)
    return verdicts


def main(args: Args):
    groups = [load_group(g, args.seeds) for g in args.groups]
    plot(groups, args.metrics, args.out)
    table(groups)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__, use_underscores=True))
