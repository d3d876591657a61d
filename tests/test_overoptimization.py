"""benchmark/overoptimization.py on synthetic runs laid out as overoptimization.sh writes them: the points are read
relative to the initial policy's scores, Gao et al.'s forms are recovered from exact curves, and the table compares the
methods at matched KL."""

import json
import math
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmark"))
import overoptimization  # noqa: E402

GOLD0, PROXY0 = 0.1, -0.2
BON = (0.5, 0.1)  # gold - gold0 = d (0.5 - 0.1 d)
RL = (0.4, 0.15)  # gold - gold0 = d (0.4 - 0.15 log d)


def write_run(folder, name, rows):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "summary.json").write_text("{}")


def rl_gold(kl):
    d = math.sqrt(kl)
    return GOLD0 + d * (RL[0] - RL[1] * math.log(d))


@pytest.fixture
def root(tmp_path):
    for seed in (1, 2):
        rows = []
        for n in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            kl = math.log(n) - (n - 1) / n
            d = math.sqrt(kl)
            rows.append({"n": n, "kl": kl, "d": d, "proxy": PROXY0 + 2 * d, "gold": GOLD0 + d * (BON[0] - BON[1] * d)})
        (tmp_path / f"bon_{seed}.json").write_text(json.dumps({"rows": rows}))
        # PPO: 6 bins of 4 updates with the same figures inside a bin (the bin's mean is then exact)
        ppo = []
        for i, kl in enumerate([0.5, 1.0, 2.0, 4.0, 8.0, 12.0]):
            ppo += [{"update": 4 * i + j + 1, "objective/kl": kl, "objective/scores": PROXY0 + kl, "objective/gold_score": rl_gold(kl)}
                    for j in range(4)]
        write_run(tmp_path / "ppo" / f"ppo_kl2__{seed}__100", "ppo", ppo)
        dpo = [{"update": 8 * i, "objective/kl": kl, "objective/scores": PROXY0 + kl / 2, "objective/gold_score": rl_gold(kl)}
               for i, kl in enumerate([1e-7, 1.0, 3.0, 9.0])]
        write_run(tmp_path / "dpo" / f"dpo_beta0.1__{seed}__100", "dpo", dpo)
    return tmp_path


def test_overoptimization_fits_and_matched_kl_table(root, tmp_path, capsys):
    out = tmp_path / "plot.png"
    overoptimization.main(overoptimization.Args(root=str(root), out=str(out), matched_kl=(1.0, 4.0, 16.0)))
    assert out.is_file() and out.stat().st_size > 10_000
    fits = json.loads(out.with_suffix(".json").read_text())["fits"]
    assert fits["best-of-n"]["alpha"][0] == pytest.approx(BON[0], abs=1e-6) and fits["best-of-n"]["beta"][0] == pytest.approx(BON[1], abs=1e-6)
    assert fits["PPO"]["alpha"][0] == pytest.approx(RL[0], abs=1e-6) and fits["PPO"]["beta"][0] == pytest.approx(RL[1], abs=1e-6)
    assert fits["best-of-n"]["alpha"][1] == pytest.approx(0.0, abs=1e-9)  # two identical seeds: no spread
    table = out.with_suffix(".md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| 4 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # KL 4 = d 2: best-of-n gold 2 (0.5 - 0.2) = 0.6, proxy 4; PPO gold exact at a point (kl 4), proxy 4; DPO interpolated
    assert cells[1].startswith("+0.600") and cells[2].startswith("+4.000")
    assert cells[3] == f"{rl_gold(4.0) - GOLD0:+.3f} ± 0.000" and cells[4].startswith("+4.000")
    last = next(line for line in table.splitlines() if line.startswith("| 16 |"))
    assert [c.strip() for c in last.strip("|").split("|")][1] == "-"  # best-of-256 reaches KL 4.55 only
    assert "ppo_kl2 | 2 |" in table and "dpo_beta0.1 | 2 |" in table
