"""benchmark/: the seed runner's slurm script and the plotter's curves, table and verdicts, on synthetic runs."""

import json
import sys

import pytest
from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "benchmark"))
import plot  # noqa: E402


def fake_group(root, name, gold_end, seeds):
    group = root / name
    for seed in seeds:
        run = group / f"both__{seed}__0"
        (run / "policy").mkdir(parents=True)
        (run / "reward").mkdir()
        with open(run / "policy" / "metrics.jsonl", "w") as f:
            for u in range(1, 21):
                m = {k: 0.1 * u for k in plot.POLICY_METRICS}
                m.update({"episode": 64 * u, "update": u, "objective/gold_score": gold_end * u / 20 + 0.01 * seed,
                          "throughput/episodes_per_s": 10.0})
                f.write(json.dumps(m) + "\n")
        evals = [{"update": u, "label": 16 * u, "test/accuracy": 0.25 + (0.35 + 0.01 * seed) * u / 64} for u in (0, 32,
                                                                                                                 64)]
        (run / "reward" / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    return group


def test_plot_draws_curves_and_judges_groups_against_the_seed_spread(tmp_path):
    a = fake_group(tmp_path, "a", 0.6, [1, 2, 3])
    b = fake_group(tmp_path, "b", 0.2, [1, 2, 3])
    c = fake_group(tmp_path, "c", 0.6, [4])
    groups = [plot.load_group(str(g)) for g in (a, b, c)]
    assert [len(runs) for _, runs in groups] == [3, 3, 1]
    plot.plot(groups, plot.POLICY_METRICS, str(tmp_path / "out.png"))
    assert (tmp_path / "out.png").stat().st_size > 10_000
    verdicts = plot.table(groups)
    gold_ab = next(v for v in verdicts if v.startswith("objective/gold_score: a") and " vs b" in v)
    assert "DIFFERENT" in gold_ab
    assert any(v.startswith("throughput/episodes_per_s: a") and " vs b" in v and "same within" in v for v in verdicts)
    assert all("too few seeds" in v for v in verdicts if " vs c" in v)
    # the last tenth of updates (2 of 20) is what the table averages
    final = groups[0][1][0]["final"]["objective/gold_score"]
    assert abs(final - (0.6 * (19 + 20) / 40 + 0.01)) < 1e-9
    assert abs(groups[0][1][0]["final"]["ppo/policy/approxkl @update 1"] - 0.1) < 1e-9  # the first step's size
    assert any(v.startswith("ppo/policy/clipfrac @update 1: a") and " vs b" in v for v in verdicts)
    # the reward model's held-out accuracy: its last evaluation, and a curve against labels seen
    assert abs(groups[0][1][1]["final"]["reward/test_accuracy"] - 0.62) < 1e-9
    assert [e["label"] for e in groups[0][1][0]["reward_curve"]] == [0, 512, 1024]


def test_plot_keeps_only_the_seeds_asked_for(tmp_path):
    a = fake_group(tmp_path, "a", 0.6, [1, 2, 3, 4, 5])
    name, runs = plot.load_group(str(a), seeds=[1, 3])
    assert name == "a" and len(runs) == 2
    assert sorted(round(r["final"]["reward/test_accuracy"], 4) for r in runs) == [0.61, 0.63]
    r = run_script([sys.executable, "benchmark/plot.py", str(a), "--seeds", "9", "--out", str(tmp_path / "x.png")])
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "seeds [9]" in r.stderr


def test_benchmark_writes_a_slurm_array_with_one_seed_per_task(tmp_path):
    r = run_script([sys.executable, "benchmark/benchmark.py", "--slurm", "--seeds", "1", "2", "3", "--tag", "sent",
                    "--command", "accelerate launch --num_processes 8 train_both.py sentiment", "--run_root",
                    str(tmp_path)])
    assert r.returncode == 0, r.stderr
    (script,) = tmp_path.glob("sent__*/sent.slurm")
    text = script.read_text()
    assert "#SBATCH --array=0-2" in text and "SEEDS=(1 2 3)" in text
    assert "train_both.py sentiment --seed $SEED --run_root" in text and "#SBATCH --nodes=1" in text


def test_benchmark_writes_a_multi_node_slurm_script_with_accelerates_flags(tmp_path):
    command = "accelerate launch --config_file configs/multinode_zero3.yaml --num_processes 16 train_policy.py tldr"
    r = run_script([sys.executable, "benchmark/benchmark.py", "--slurm", "--nodes", "2", "--seeds", "1", "--tag", "big",
                    "--command", command, "--run_root", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    text = next(tmp_path.glob("big__*/big.slurm")).read_text()
    assert "#SBATCH --nodes=2" in text and "srun --nodes=2 --ntasks-per-node=1 bash -c '" in text
    assert ("accelerate launch --num_machines $SLURM_NNODES --machine_rank $SLURM_NODEID --main_process_ip $MAIN_IP "
            "--main_process_port 29500 --rdzv_backend c10d --config_file configs/multinode_zero3.yaml") in text
    r = run_script([sys.executable, "benchmark/benchmark.py", "--nodes", "2", "--command", "python train_policy.py",
                    "--run_root", str(tmp_path)])
    assert r.returncode == 2 and r.stderr.startswith("error: --nodes")


def test_benchmark_runs_each_seed_locally_and_records_it(tmp_path):
    command = f"{sys.executable} -c \"import sys; print(sys.argv[1:])\""
    r = run_script([sys.executable, "benchmark/benchmark.py", "--seeds", "4", "5", "--tag", "t", "--workers", "2",
                    "--command", command, "--run_root", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    (group,) = tmp_path.glob("t__*")
    rows = [json.loads(line) for line in open(group / "benchmark.jsonl")]
    assert [row["seed"] for row in rows] == [4, 5] and all(row["returncode"] == 0 for row in rows)
    assert "'--seed', '5', '--run_root'" in (group / "seed5.log").read_text()


@pytest.mark.slow
def test_gpu_throughput_measures_each_config_on_a_model_of_the_given_architecture(tmp_path):
    """The GPU harness at toy size on the CPU: a random model of the --like folder's architecture (its config and
    tokenizer only), one train_policy.py run per --config, episodes/s, phase seconds and the share of the matmul
    peak."""
    from transformers import AutoTokenizer, GPT2Config

    like = tmp_path / "like"
    GPT2Config(vocab_size=4096, n_positions=128, n_embd=32, n_layer=1, n_head=2).save_pretrained(like)
    AutoTokenizer.from_pretrained(ROOT / "data" / "nano").save_pretrained(like)
    r = run_script([sys.executable, "benchmark/gpu_throughput.py", "--like", str(like), "--updates", "2",
                    "--batch_size", "16", "--mixed_precision", "no", "--config",
                    "micro8=--local_micro_batch_size 8 --local_rollout_forward_batch_size 8", "--out",
                    str(tmp_path / "out")], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    (run,) = result["runs"]
    assert run["config"] == "micro8" and run["episodes_per_s"] > 0 and 0 < run["update_peak_fraction"] < 1.5
    assert "| ours | micro8 |" in r.stdout
    assert (tmp_path / "out" / "random_base" / "config.json").is_file()
