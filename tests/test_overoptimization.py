"""benchmark/overoptimization.py and benchmark/turn_down.py on synthetic runs laid out as overoptimization.sh writes
them: the points are read relative to the initial policy's scores, Gao et al.'s forms are recovered from exact curves,
the tables compare the methods at matched KL, --previous merges an earlier run's methods only when its best-of-n points
are these, and a turn-down is measured where the gold falls while the proxy climbs."""

import json
import math
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmark"))
import overoptimization  # noqa: E402
import turn_down  # noqa: E402

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
            ppo += [{"update": 4 * i + j + 1, "objective/kl": kl, "objective/scores": PROXY0 + kl,
                     "objective/gold_score": rl_gold(kl)}
                    for j in range(4)]
        write_run(tmp_path / "ppo" / f"ppo_kl2__{seed}__100", "ppo", ppo)
        dpo = [{"update": 8 * i, "objective/kl": kl, "objective/scores": PROXY0 + kl / 2,
                "objective/gold_score": rl_gold(kl)}
               for i, kl in enumerate([1e-7, 1.0, 3.0, 9.0])]
        write_run(tmp_path / "dpo" / f"dpo_beta0.1__{seed}__100", "dpo", dpo)
        # train_rloo.py --advantage grpo: binned as PPO, gold on the same RL curve
        write_run(tmp_path / "rloo" / f"grpo__{seed}__100", "grpo", ppo)
    return tmp_path


def test_overoptimization_fits_and_matched_kl_table(root, tmp_path, capsys):
    out = tmp_path / "plot.png"
    overoptimization.main(overoptimization.Args(root=str(root), out=str(out), matched_kl=(1.0, 4.0, 16.0)))
    assert out.is_file() and out.stat().st_size > 10_000
    fits = json.loads(out.with_suffix(".json").read_text())["fits"]
    assert fits["best-of-n"]["alpha"][0] == pytest.approx(BON[0], abs=1e-6)
    assert fits["best-of-n"]["beta"][0] == pytest.approx(BON[1], abs=1e-6)
    assert fits["PPO"]["alpha"][0] == pytest.approx(RL[0], abs=1e-6)
    assert fits["PPO"]["beta"][0] == pytest.approx(RL[1], abs=1e-6)
    assert fits["best-of-n"]["alpha"][1] == pytest.approx(0.0, abs=1e-9)  # two identical seeds: no spread
    assert fits["GRPO"]["alpha"][0] == pytest.approx(RL[0], abs=1e-6)
    assert fits["GRPO"]["beta"][0] == pytest.approx(RL[1], abs=1e-6)
    assert "RLOO" not in fits  # no runs of it
    table = out.with_suffix(".md").read_text()
    gold_table, proxy_table = table.split("| KL (nats): gold - initial |")[1].split("| KL (nats): proxy - initial |")
    assert gold_table.splitlines()[0].split("|")[:-1] == [" best-of-n ", " PPO ", " DPO ", " GRPO "]
    def cell(table: str, kl) -> list:
        row = next(line for line in table.splitlines() if line.startswith(f"| {kl} |"))
        return [c.strip() for c in row.strip("|").split("|")]
    # KL 4 = d 2: best-of-n gold 2 (0.5 - 0.2) = 0.6, proxy 4; PPO and GRPO gold exact at a point (kl 4), proxy 4
    assert cell(gold_table, 4)[1] == "+0.600 ± 0.000" and cell(proxy_table, 4)[1] == "+4.000 ± 0.000"
    assert cell(gold_table, 4)[2] == cell(gold_table, 4)[4] == f"{rl_gold(4.0) - GOLD0:+.3f} ± 0.000"
    assert cell(proxy_table, 4)[2] == "+4.000 ± 0.000"
    assert cell(gold_table, 16)[1] == "-"  # best-of-256 reaches KL 4.55 only
    assert "ppo_kl2 | 2 |" in table and "dpo_beta0.1 | 2 |" in table and "grpo | 2 |" in table


def test_previous_fills_missing_methods_only_from_the_same_reward_models(root, tmp_path):
    first = tmp_path / "first.png"
    overoptimization.main(overoptimization.Args(root=str(root), out=str(first), matched_kl=(1.0, 4.0)))
    for folder in ("ppo", "dpo"):  # a second run that has only GRPO's runs (and best-of-n)
        for run in (root / folder).iterdir():
            (run / "summary.json").unlink()
    second = tmp_path / "second.png"
    overoptimization.main(overoptimization.Args(root=str(root), out=str(second), matched_kl=(1.0, 4.0),
                                                previous=str(first.with_suffix(".json"))))
    a, b = (json.loads(f.with_suffix(".json").read_text()) for f in (first, second))
    assert b["points"]["PPO"] == a["points"]["PPO"] and b["fits"]["DPO"] == a["fits"]["DPO"]
    assert "ppo_kl2 | 2 |" in second.with_suffix(".md").read_text()  # the row carried over from the earlier table
    rows = json.loads((root / "bon_1.json").read_text())
    rows["rows"][3]["gold"] += 0.01  # another reward model: the merge is refused
    (root / "bon_1.json").write_text(json.dumps(rows))
    with pytest.raises(SystemExit, match="differ from bon_1.json"):
        overoptimization.main(overoptimization.Args(root=str(root), out=str(second),
                                                    previous=str(first.with_suffix(".json"))))


def test_turn_down_finds_the_gold_falling_while_the_proxy_climbs(root, tmp_path):
    # two label counts: with 256 labels gold peaks at KL 16 then falls by 0.3 while the proxy keeps rising; with 2048 it
    # keeps rising. Reward runs give the held-out accuracy (the 2048 one is reward/'s default reward model)
    for seed in (1, 2):
        for n, golds in ((256, [0.1, 0.3, 0.5, 0.6, 0.45, 0.3]), (2048, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])):
            rows = []
            for i, (kl, g) in enumerate(zip([1.0, 4.0, 9.0, 16.0, 25.0, 36.0], golds)):
                rows += [{"update": 4 * i + j + 1, "objective/kl": kl, "objective/scores": kl / 4,
                          "objective/gold_score": GOLD0 + g} for j in range(4)]
            write_run(root / "labels" / f"ppo_nokl_{n}__{seed}__100", "ppo", rows)
            name = f"reward_{n}__{seed}__100" if n < 2048 else f"reward__{seed}__100"
            reward = root / ("labels" if n < 2048 else "reward") / name
            reward.mkdir(parents=True)
            (reward / "summary.json").write_text(json.dumps({"test/accuracy/after": 0.5 + n / 10000}))
            (reward / "metrics.jsonl").write_text(json.dumps({"train/loss": 1.0}) + "\n")
    out = tmp_path / "turn.png"
    turn_down.main(turn_down.Args(root=str(root), out=str(out)))
    assert out.is_file() and out.stat().st_size > 10_000
    figures = json.loads(out.with_suffix(".json").read_text())["figures"]
    low, high = figures["256"]["1"], figures["2048"]["1"]
    assert low["gold_peak"] == pytest.approx(0.6)
    assert low["d_at_peak"] == pytest.approx(4.0) and low["drop"] == pytest.approx(0.3)
    assert low["proxy_gain_after_peak"] == pytest.approx(5.0)  # kl 36 / 4 - kl 16 / 4
    assert high["drop"] == pytest.approx(0.0)
    table = out.with_suffix(".md").read_text()
    assert "| 256 | 0.526 ± 0.000 |" in table and "| 2 of 2 |" in table and "| 0 of 2 |" in table
