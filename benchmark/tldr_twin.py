"""The summarization twin over seeds (the runs of benchmark/tldr_twin.sh): per seed the SFT model's held-out judge score
and ROUGE-L, the reward model's held-out accuracy (all comparisons and sample against sample), best-of-8's judge gain,
PPO's and DPO's held-out judge score, ROUGE-L and KL before and after, and the wall time of each stage; a table
(markdown, and JSON beside the plot) and a plot of the held-out judge score and ROUGE-L against the share of training
done, for PPO and DPO (mean and spread over seeds) with the SFT model's level.

    python benchmark/tldr_twin.py --root runs/tldr_twin_sweep --out docs/images/tldr_twin.png

The SFT model's figures are PPO's evaluation before its first update (the same 256 held-out posts, temperature 0.7);
DPO samples the same posts at the same temperature.
"""

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import tyro  # noqa: E402


@dataclass
class Args:
    root: str = "runs/tldr_twin_sweep"
    """benchmark/tldr_twin.sh's run folder"""
    out: str = "docs/images/tldr_twin.png"
    """the plot; the table goes to <out>.md and the figures to <out>.json"""


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in open(path)]


def only(pattern: str, root: Path) -> Path:
    """The one finished run (a folder with a summary.json) matching pattern under root."""
    found = sorted(p.parent for p in root.glob(f"{pattern}/summary.json"))
    if len(found) != 1:
        raise SystemExit(f"error: {len(found)} finished runs match {root}/{pattern}; expected one")
    return found[0]


def seed_figures(root: Path, seed: int) -> dict:
    """Every figure of one seed, and its curves: (share of training, judge, ROUGE-L) per method."""
    sft = only(f"sft/sft_tldr_twin__{seed}__*", root)
    both = only(f"tldr_twin__{seed}__*", root)
    dpo = only(f"dpo/dpo__{seed}__*", root)
    reward = json.loads((both / "reward" / "summary.json").read_text())
    policy = json.loads((both / "policy" / "summary.json").read_text())
    ppo_evals = [m for m in read_jsonl(both / "policy" / "metrics.jsonl") if "eval/gold_score" in m]
    dpo_evals = [m for m in read_jsonl(dpo / "metrics.jsonl") if "objective/gold_score" in m]
    bon = {r["n"]: r for r in json.loads((root / f"best_of_8_{seed}.json").read_text())["rows"]}
    last_ppo, last_dpo = ppo_evals[-1]["update"], dpo_evals[-1]["update"]
    return {
        "seed": seed,
        "sft_judge": ppo_evals[0]["eval/gold_score"], "sft_rougeL": ppo_evals[0]["eval/rougeL"],
        "rm_accuracy": reward["test/accuracy/after"], "rm_accuracy_samples": reward["test/accuracy/batch/twin_samples"],
        "bon1_judge": bon[1]["gold"], "bon8_judge": bon[8]["gold"],
        "ppo_judge": ppo_evals[-1]["eval/gold_score"], "ppo_rougeL": ppo_evals[-1]["eval/rougeL"],
        "ppo_kl": policy["kl/last_tenth"], "dpo_judge_before": dpo_evals[0]["objective/gold_score"],
        "dpo_rougeL_before": dpo_evals[0]["eval/rougeL"], "dpo_judge": dpo_evals[-1]["objective/gold_score"],
        "dpo_rougeL": dpo_evals[-1]["eval/rougeL"], "dpo_kl": dpo_evals[-1]["objective/kl"],
        "wall_sft": json.loads((sft / "summary.json").read_text())["wall_s"], "wall_reward": reward["wall_s"],
        "wall_ppo": policy["wall_s"], "wall_dpo": json.loads((dpo / "summary.json").read_text())["wall_s"], "curves": {
            "PPO": [(m["update"] / last_ppo, m["eval/gold_score"], m["eval/rougeL"]) for m in ppo_evals],
            "DPO": [(m["update"] / last_dpo, m["objective/gold_score"], m["eval/rougeL"]) for m in dpo_evals],
        },
    }


COLUMNS = [  # (header, format of one seed's row)
    ("seed", lambda f: str(f["seed"])),
    ("SFT judge / ROUGE-L", lambda f: f"{f['sft_judge']:.3f} / {f['sft_rougeL']:.3f}"),
    ("RM accuracy (all / sample vs sample)", lambda f: f"{f['rm_accuracy']:.3f} / {f['rm_accuracy_samples']:.3f}"),
    ("best-of-8 judge (n = 1 -> 8)",
     lambda f: f"{f['bon1_judge']:.3f} -> {f['bon8_judge']:.3f} ({f['bon8_judge'] - f['bon1_judge']:+.3f})"),
    ("PPO judge", lambda f: f"{f['sft_judge']:.3f} -> {f['ppo_judge']:.3f} ({f['ppo_judge'] - f['sft_judge']:+.3f})"),
    ("PPO ROUGE-L", lambda f: f"{f['sft_rougeL']:.3f} -> {f['ppo_rougeL']:.3f}"),
    ("PPO KL (last rollouts)", lambda f: f"{f['ppo_kl']:.2f}"),
    ("DPO judge",
     lambda f: f"{f['dpo_judge_before']:.3f} -> {f['dpo_judge']:.3f} ({f['dpo_judge'] - f['dpo_judge_before']:+.3f})"),
    ("DPO ROUGE-L", lambda f: f"{f['dpo_rougeL_before']:.3f} -> {f['dpo_rougeL']:.3f}"),
    ("DPO KL (held-out samples)", lambda f: f"{f['dpo_kl']:.2f}"),
    ("wall SFT + RM + PPO (DPO)", lambda f: f"{f['wall_sft']:.0f} + {f['wall_reward']:.0f} + {f['wall_ppo']:.0f} = "
                                          f"{f['wall_sft'] + f['wall_reward'] + f['wall_ppo']:.0f} s "
                                          f"({f['wall_dpo']:.0f} s)"),
]


def table(figures: list) -> str:
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(f) for _, fmt in COLUMNS) + " |" for f in figures]
    return "\n".join(lines)


def plot(figures: list, out: str):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, column, label in ((axes[0], 1, "judge score of held-out posts"), (axes[1], 2, "ROUGE-L of held-out posts")):
        sft = statistics.mean(f["curves"]["PPO"][0][column] for f in figures)
        ax.axhline(sft, color="gray", linestyle="--", label="SFT")
        for method, color in (("PPO", "C0"), ("DPO", "C1")):
            # per evaluation, one value per seed
            points = list(zip(*[[p[column] for p in f["curves"][method]] for f in figures]))
            x = [p[0] for p in figures[0]["curves"][method]]
            mean = [statistics.mean(v) for v in points]
            spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in points]
            ax.plot(x, mean, color=color, marker="o", label=method)
            ax.fill_between(x, [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)],
                            color=color, alpha=0.2)
        ax.set_xlabel("share of training done (PPO: 16 updates of 64 episodes; DPO: 32 of 64 pairs)")
        ax.set_title(label)
        ax.legend()
    fig.suptitle(f"the summarization twin, {len(figures)} seed(s): mean and std over seeds")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(a: Args) -> list:
    root = Path(a.root)
    seeds = sorted({int(p.name.split("__")[1]) for p in root.glob("tldr_twin__*__*")})
    figures = [seed_figures(root, seed) for seed in seeds]
    md = table(figures)
    print(md)
    Path(a.out).with_suffix(".md").write_text(md + "\n")
    Path(a.out).with_suffix(".json").write_text(json.dumps([{k: v for k,
                                                             v in f.items() if k != "curves"} for f in figures],
                                                             indent=2))
    plot(figures, a.out)
    return figures


if __name__ == "__main__":
    main(tyro.cli(Args))
