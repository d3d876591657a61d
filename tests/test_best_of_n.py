"""benchmark/best_of_n.py: the best-of-n KL formula against the exact KL of a many-valued distribution, the group
estimator, and a tiny run end to end."""

import json
import math
import sys

import pytest
import torch
import tyro
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmark"))
import best_of_n  # noqa: E402


def run_best_of_n(*flags) -> list:
    """`python benchmark/best_of_n.py <flags>` in this process."""
    return best_of_n.main(tyro.cli(best_of_n.Args, args=[str(f) for f in flags]))


@pytest.mark.parametrize("n", [1, 2, 4, 16, 256])
def test_best_of_n_kl_matches_the_exact_kl_of_a_distribution_without_ties(n):
    # K equally likely outcomes with distinct rewards: best-of-n picks outcome k with P(k) = (k/K)^n - ((k-1)/K)^n
    K = 200_000
    k = torch.arange(1, K + 1, dtype=torch.float64)
    p_best = (k / K) ** n - ((k - 1) / K) ** n
    exact = (p_best * torch.log(p_best * K)).where(p_best > 0, torch.zeros(())).sum().item()
    assert best_of_n.bon_kl(n) == pytest.approx(exact, abs=1e-3)
    assert best_of_n.bon_kl(n) == pytest.approx(math.log(n) - (n - 1) / n)


def test_group_estimator_keeps_the_best_proxy_of_each_group_and_reports_its_gold():
    proxy = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 4.0, 7.0, 6.0]])
    gold = -proxy  # the gold score of the proxy's pick
    assert best_of_n.best_of_n(proxy, gold, 1) == pytest.approx((proxy.mean().item(), gold.mean().item()))
    # n = 2: groups [0, 3], [1, 2], [5, 4], [7, 6] -> picks 3, 2, 5, 7
    assert best_of_n.best_of_n(proxy, gold, 2) == pytest.approx((17 / 4, -17 / 4))
    assert best_of_n.best_of_n(proxy, gold, 4) == pytest.approx((5.0, -5.0))


def test_best_of_n_end_to_end_on_a_tiny_reward_model(tmp_path, tiny_reward_model, capsys):
    out = tmp_path / "bon.json"
    run_best_of_n("--reward_model", tiny_reward_model, "--base_model", ROOT / "data" / "nano", "--query_dataset",
                  ROOT / "data" / "corpus.jsonl.gz", "--num_queries", "4", "--max_n", "8", "--batch_size", "16",
                  "--out", out)
    rows = json.loads(out.read_text())["rows"]
    assert [row["n"] for row in rows] == [1, 2, 4, 8]
    assert rows[0]["kl"] == 0 and rows[3]["kl"] == pytest.approx(math.log(8) - 7 / 8)
    assert all(a["proxy"] <= b["proxy"] + 1e-6 for a, b in zip(rows, rows[1:]))  # nested groups: never lower
    assert all(-1 <= row["gold"] <= 1 for row in rows)  # VADER's compound score
    assert set(json.loads(out.read_text())["fits"]) == {"proxy", "gold"}
    assert "best-of-n by" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        run_best_of_n("--reward_model", tiny_reward_model, "--max_n", "6")
    assert stop.value.code == 2 and "--max_n 6 is not a power of 2" in capsys.readouterr().err


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_gao_fits_recover_known_coefficients_from_synthetic_points(form):
    alpha, beta = 0.9, 0.25
    d = [0.2 * i for i in range(1, 16)]
    shape = (lambda x: x * x) if form == "bon" else (lambda x: x * math.log(x))
    noise = torch.Generator().manual_seed(0)
    r = [alpha * x - beta * shape(x) + 0.002 * torch.randn((), generator=noise).item() for x in d]
    fitted = best_of_n.fit_gao(d, r, form)
    assert fitted == pytest.approx((alpha, beta), abs=0.01)
    exact = best_of_n.fit_gao(d, [alpha * x - beta * shape(x) for x in d], form)
    assert exact == pytest.approx((alpha, beta), abs=1e-9)
