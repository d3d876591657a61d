"""Gold at matched KL: runs that reach different KLs compared where they pass the same KL, read along each run's path of
(KL, gold) over updates, as the over-optimization picture draws it. Each run's objective/kl and objective/gold_score are
smoothed by a running mean over `window` updates; at each target KL the first update whose smoothed KL reaches it
gives that run's gold there. Beside it, the KL's stability: the smoothed KL's largest drop over the run, and the
standard deviation of the per-update KL over the last tenth of updates.

    python benchmark/kl_matched.py runs/benchmark/kl_k1_reward__<commit> runs/benchmark/kl_k2_loss__<commit> ... \
        --out docs/images/kl_estimators.png
"""

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import tyro


@dataclass
class Args:
    folders: tyro.conf.Positional[List[str]]
    """benchmark folders (benchmark/benchmark.py's <tag>__<commit>), each holding one run per seed"""
    targets: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 3.5])
    """KLs (nats) at which to read gold"""
    window: int = 5
    """updates in the running mean"""
    out: Optional[str] = None
    """draw gold against KL, every run's smoothed path, here"""


def smoothed(values: list, window: int) -> list:
    """The running mean of the last `window` values (fewer at the start)."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))]


def run_paths(folder: Path, window: int) -> list:
    """(smoothed KL, smoothed gold, per-update KL) of each run in a benchmark folder."""
    paths = []
    for metrics in sorted(folder.glob("*/metrics.jsonl")):
        updates = [m for m in map(json.loads, open(metrics)) if "objective/kl" in m]
        kl, gold = [m["objective/kl"] for m in updates], [m["objective/gold_score"] for m in updates]
        paths.append((smoothed(kl, window), smoothed(gold, window), kl))
    return paths


def gold_at(kl: list, gold: list, target: float) -> Optional[float]:
    """Gold at the first update whose smoothed KL reaches the target, or None if it never does."""
    return next((g for k, g in zip(kl, gold) if k >= target), None)


def main(args: Args):
    paths_of = {Path(folder): run_paths(Path(folder), args.window) for folder in args.folders}
    rows = {}
    for folder, paths in paths_of.items():
        row = {"runs": len(paths)}
        for target in args.targets:
            golds = [g for g in (gold_at(kl, gold, target) for kl, gold, _ in paths) if g is not None]
            row[f"gold@kl{target}"] = (statistics.mean(golds), len(golds)) if golds else None
        row["kl_last_tenth"] = statistics.mean(statistics.mean(raw[-max(1, len(raw) // 10) :]) for *_, raw in paths)
        row["kl_largest_drop"] = max(max(max(kl[:i + 1]) - kl[i] for i in range(len(kl))) for kl, *_ in paths)
        row["kl_std_last_tenth"] = statistics.mean(statistics.pstdev(raw[-max(2, len(raw) // 10) :])
                                                   for *_, raw in paths)
        rows[folder.name.split("__")[0]] = row
    print("| runs | " + " | ".join(f"gold at KL {t}" for t in args.targets)
          + " | KL, last tenth | KL's largest drop | KL's std, last tenth |")
    print("|---" * (len(args.targets) + 4) + "|")
    for name, row in rows.items():
        cells = [f"{row[f'gold@kl{t}'][0]:.3f} ({row[f'gold@kl{t}'][1]} of {row['runs']})" if row[f"gold@kl{t}"]
                 else "not reached" for t in args.targets]
        print(f"| {name} | " + " | ".join(cells) + f" | {row['kl_last_tenth']:.2f} | {row['kl_largest_drop']:.2f} | "
              f"{row['kl_std_last_tenth']:.2f} |")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for color, (folder, paths) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], paths_of.items()):
            for i, (kl, gold, _) in enumerate(paths):
                ax.plot(kl, gold, color=color, alpha=0.8, label=folder.name.split("__")[0] if i == 0 else None)
        ax.set_xlabel(f"KL to the initial policy (nats; running mean of {args.window} updates)")
        ax.set_ylabel("gold score (VADER)")
        ax.set_title("gold against KL along each run, 3 seeds per arm")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out, dpi=120)
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
