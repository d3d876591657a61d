"""Reward over-optimization as Gao, Schulman & Hilton measured it ("Scaling Laws for Reward Model Overoptimization",
2022), on the embedded sentiment world: the gold score (VADER, the labeler behind the labels) and the proxy score (the
learned reward model) against the distance from the initial policy, d = sqrt(KL), for best-of-n, PPO, DPO and the
critic-free methods of train_rloo.py (RLOO, GRPO, online best-of-n).

    bash benchmark/overoptimization.sh                      # runs everything, then this and benchmark/turn_down.py
    python benchmark/overoptimization.py --root runs/overoptimization --out docs/images/overoptimization.png

The folder holds what overoptimization.sh writes: reward/ (one reward model per seed), bon_<seed>.json
(benchmark/best_of_n.py), ppo/, dpo/ and rloo/ (runs named <exp>__<seed>__<time>, exp = ppo_<setting>, dpo_<setting>,
or the --advantage of train_rloo.py). Points: best-of-n at n = 1 ... 256 (KL = log n - (n-1)/n); PPO and the critic-free
methods along training, every 4 updates averaged (KL, proxy and gold of the samples drawn at those updates); DPO at each
evaluation (fresh samples of 256 fixed queries). Scores are measured from the initial policy's, estimated per seed by
best-of-1 (64 queries x 256 samples), so that R(0) = 0 as in Gao et al.'s forms; best-of-n's d(alpha - beta d) is fitted
to its gold points, RL's d(alpha - beta log d) to every trained method's, per seed; the table gives mean and standard
deviation over seeds, and every method's gold and proxy at matched KL (linear interpolation along d within the range
each method reached).

--previous adds methods from an earlier run of this script without running them again: the points of every method that
has no runs under --root are read from that overoptimization.json, after checking that its best-of-n points equal the
new bon_<seed>.json's (same reward models, so the points are comparable); otherwise the script stops.
"""

import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from best_of_n import fit_gao  # noqa: E402


@dataclass
class Args:
    root: str = "runs/overoptimization"
    """the folder benchmark/overoptimization.sh wrote"""
    out: str = "docs/images/overoptimization.png"
    """the plot; the table goes to the same name with .md, the points and fits to .json"""
    matched_kl: tuple = (0.5, 1.0, 2.0, 4.0, 8.0)
    """KL values (nats) at which the methods' gold and proxy scores are compared"""
    bin_updates: int = 4
    """PPO (and RLOO, GRPO, online best-of-n) updates averaged into one point"""
    previous: Optional[str] = None
    """an earlier overoptimization.json whose points stand in for the methods that have no runs under root"""


CRITIC_FREE = {"rloo": "RLOO", "grpo": "GRPO", "best_of_n": "online best-of-n"}
"""train_rloo.py --advantage (the run's exp name) -> the method's name in the plot and tables"""


def ppo_points(metrics: list, bin_updates: int) -> list:
    """(kl, proxy, gold) of each bin of bin_updates consecutive updates (PPO, RLOO, ...): means over the bin's
    samples."""
    updates = [m for m in metrics if "objective/kl" in m and "objective/gold_score" in m]
    out = []
    for i in range(0, len(updates) - bin_updates + 1, bin_updates):
        b = updates[i : i + bin_updates]
        out.append(tuple(sum(m[k] for m in b) / len(b) for k in ("objective/kl", "objective/scores",
                                                                 "objective/gold_score")))
    return out


def dpo_points(metrics: list) -> list:
    """(kl, proxy, gold) at each evaluation of a DPO run (including the initial policy's at update 0)."""
    return [(m["objective/kl"], m["objective/scores"],
             m["objective/gold_score"]) for m in metrics if "objective/scores" in m and "objective/kl" in m]


def runs(folder: Path) -> dict:
    """{(setting, seed): metrics} of the run folders <exp>__<seed>__<time> under folder (the newest of each)."""
    found = {}
    for run in sorted(folder.glob("*__*__*")):
        exp, seed, _ = run.name.split("__")
        if (run / "summary.json").is_file():
            found[(exp, int(seed))] = [json.loads(line) for line in open(run / "metrics.jsonl")]
    return found


def interpolate(points: list, kl: float, index: int):
    """The score (index 1 proxy, 2 gold) at the given KL, linear along d = sqrt(KL) between the method's points sorted
    by d; None outside the range of d the method reached."""
    pts = sorted((math.sqrt(max(p[0], 0.0)), p[index]) for p in points)
    d = math.sqrt(kl)
    if not pts or d < pts[0][0] or d > pts[-1][0]:
        return None
    return float(np.interp(d, [p[0] for p in pts], [p[1] for p in pts]))


def take_previous(points: dict, previous: dict, path: str):
    """Fill the methods of `points` that have no runs with an earlier run's points (in place), after checking that the
    earlier best-of-n points equal these (within 1e-6: the same reward models and initial policy)."""
    for seed, pts in points["best-of-n"].items():
        old = previous["points"]["best-of-n"].get(str(seed))
        same = old is not None and len(old) == len(pts) and all(abs(x - y) <= 1e-6 for p, q in zip(old, pts)
                                                                  for x, y in zip(p, q))
        if not same:
            sys.exit(f"error: --previous {path}: its best-of-n points of seed {seed} differ from bon_{seed}.json's, so "
                     "its reward models are not these; run every method here instead")
    for method, per_seed in previous["points"].items():
        if method in points and not points[method]:
            points[method] = {int(seed): [tuple(p) for p in pts] for seed, pts in per_seed.items()}


def mean_std(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:+.3f}"
    return f"{statistics.mean(values):+.3f} ± {statistics.stdev(values):.3f}"


def main(a: Args):
    root = Path(a.root)
    seeds = sorted(int(p.stem.split("_")[1]) for p in root.glob("bon_*.json"))
    if not seeds:
        sys.exit(f"error: {root}: no bon_<seed>.json (run benchmark/overoptimization.sh first)")
    trained = {"PPO": runs(root / "ppo"), "DPO": runs(root / "dpo")}
    for exp, method in CRITIC_FREE.items():  # train_rloo.py's runs, one method per --advantage
        trained[method] = {key: m for key, m in runs(root / "rloo").items() if key[0] == exp}
    # method -> seed -> [(kl, proxy - proxy_0, gold - gold_0)], setting kept for the plot
    points = {"best-of-n": {}, **{method: {} for method in trained}}
    settings = {method: {} for method in trained}
    ends = {}  # (method, setting) -> per run (largest KL, proxy and gold at its end), relative to the initial policy
    for seed in seeds:
        bon = json.loads((root / f"bon_{seed}.json").read_text())["rows"]
        proxy0, gold0 = bon[0]["proxy"], bon[0]["gold"]
        rel = lambda pts: [(k, p - proxy0, g - gold0) for k, p, g in pts]
        points["best-of-n"][seed] = rel([(r["kl"], r["proxy"], r["gold"]) for r in bon])
        for method, found in trained.items():
            extract = dpo_points if method == "DPO" else lambda m: ppo_points(m, a.bin_updates)
            for (exp, s), metrics in sorted(found.items()):
                if s == seed:
                    pts = rel(extract(metrics))
                    points[method].setdefault(seed, []).extend(pts)
                    settings[method].setdefault(exp, []).extend(pts)
                    ends.setdefault((method, exp), []).append((max(p[0] for p in pts), pts[-1][1], pts[-1][2]))
    if a.previous:
        take_previous(points, json.loads(Path(a.previous).read_text()), a.previous)
    points = {method: per_seed for method, per_seed in points.items() if per_seed}
    settings = {method: v for method, v in settings.items() if method in points}

    # Gao et al.'s forms fitted per seed to the gold points (d > 0)
    fits = {}
    for method in points:
        form = "bon" if method == "best-of-n" else "rl"
        per_seed = []
        for seed, pts in sorted(points[method].items()):
            pts = [p for p in pts if p[0] > 1e-6]
            if len(pts) >= 2:
                per_seed.append(fit_gao([math.sqrt(p[0]) for p in pts], [p[2] for p in pts], form))
        if per_seed:
            fits[method] = {"form": form, "per_seed": per_seed,
                            "alpha": [statistics.mean(f[0] for f in per_seed),
                                      statistics.stdev(f[0] for f in per_seed) if len(per_seed) > 1 else 0.0],
                            "beta": [statistics.mean(f[1] for f in per_seed),
                                     statistics.stdev(f[1] for f in per_seed) if len(per_seed) > 1 else 0.0]}

    # the plot: gold and proxy against d, every point of every seed, and the fitted gold curves (mean coefficients)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"best-of-n": "tab:green", "PPO": "tab:blue", "DPO": "tab:red", "RLOO": "tab:orange", "GRPO": "tab:purple",
              "online best-of-n": "tab:brown"}
    markers = ["o", "s", "^", "v", "D", "P"]
    for ax, index, name in ((axes[0], 2, "gold (VADER) - initial"), (axes[1], 1, "proxy (reward model) - initial")):
        seed_bon = [p for s in sorted(points["best-of-n"]) for p in points["best-of-n"][s]]
        ax.scatter([math.sqrt(p[0]) for p in seed_bon], [p[index] for p in seed_bon], s=14, color=colors["best-of-n"],
                   label="best-of-n (n = 1 ... 256)")
        for method in settings:
            groups = sorted(settings[method].items()) or [(method, [p for s in points[method].values() for p in s])]
            for i, (exp, pts) in enumerate(groups):  # a method read from --previous is one group
                ax.scatter([math.sqrt(max(p[0], 0)) for p in pts], [p[index] for p in pts], s=12, alpha=0.6,
                           color=colors[method], marker=markers[i % len(markers)],
                           label=exp if method in ("PPO", "DPO") else method)
        if index == 2:
            for method, f in fits.items():
                # each fitted curve over the distances its own method reached (no extrapolation)
                d = np.linspace(1e-3, max(math.sqrt(max(p[0], 0)) for pts in points[method].values() for p in pts), 200)
                second = d * d if f["form"] == "bon" else d * np.log(d)
                ax.plot(d, d * f["alpha"][0] - f["beta"][0] * second, color=colors[method], lw=2,
                        label=f"{method} fit: d({f['alpha'][0]:.3f} {'-' if f['beta'][0] >= 0 else '+'} "
                              f"{abs(f['beta'][0]):.3f} "
                              f"{'d' if f['form'] == 'bon' else 'log d'})")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("d = sqrt(KL(policy || initial policy))  [nats^0.5]")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Reward over-optimization on the embedded sentiment world ({len(seeds)} seeds; one reward model per "
                 "seed)")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)

    # the table: fitted coefficients and the methods at matched KL
    lines = ["| method | form | alpha (mean ± std over seeds) | beta |", "|---|---|---|---|"]
    for method, f in fits.items():
        form = "d(α − β d)" if f["form"] == "bon" else "d(α − β log d)"
        lines.append(f"| {method} | {form} | {f['alpha'][0]:.3f} ± {f['alpha'][1]:.3f} | {f['beta'][0]:.3f} ± "
                     f"{f['beta'][1]:.3f} |")
    for index, score in ((2, "gold"), (1, "proxy")):
        lines += ["", f"| KL (nats): {score} - initial | " + " | ".join(points) + " |",
                  "|---" * (1 + len(points)) + "|"]
        for kl in a.matched_kl:
            cells = [mean_std([interpolate(pts, kl, index) for pts in points[method].values()]) for method in points]
            lines.append(f"| {kl:g} | " + " | ".join(cells) + " |")
    lines += ["",
              "| run setting | seeds | largest KL reached | gold at the end - initial | proxy at the end - initial |",
              "|---|---|---|---|---|"]
    for (method, exp), finals in sorted(ends.items(), key=lambda kv: (kv[0][0] != "PPO", kv[0][1])):
        lines.append(f"| {exp} | {len(finals)} | {mean_std([f[0] for f in finals])} | "
                     f"{mean_std([f[2] for f in finals])} | "
                     f"{mean_std([f[1] for f in finals])} |")
    if a.previous:  # the rows of the settings read from --previous, as its table (next to its .json) gave them
        table_rows = Path(a.previous).with_suffix(".md").read_text().split("| run setting |")[1].splitlines()[2:]
        lines += [row for row in table_rows if row.startswith("| ") and (row.split(" | ")[0][2:] not in {e for _,
                                                                                                         e in ends})]
    table = "\n".join(lines)
    Path(a.out).with_suffix(".md").write_text(table + "\n")
    Path(a.out).with_suffix(".json").write_text(json.dumps({"points": {m: {str(s): p for s, p in v.items()} for m,
                                                                       v in points.items()},
                                                            "fits": fits,
                                                            "ends": {f"{m}/{e}": v for (m, e), v in ends.items()}},
                                                            indent=1))
    print(table)
    print(f"plot: {a.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
