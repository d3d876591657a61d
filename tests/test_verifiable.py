"""RL with verifiable rewards: the arithmetic task (data/build.py's stage g), the verifier that checks its answers, the
checks of the flags, and short runs of SFT, GRPO and PPO against the verifier instead of a reward model."""

import gzip
import itertools
import json
import random
import sys

import pytest
import torch
from conftest import ROOT, only_run
from transformers import AutoTokenizer

import train_policy
import train_rloo
import train_sft

sys.path.insert(0, str(ROOT / "data"))
import build  # noqa: E402  (data/build.py)

verify = train_policy.arithmetic_verifier


def test_a_right_answer_scores_1_and_a_wrong_one_0():
    assert verify("47+38=", "7+8=15, 4+3+1=8. Answer: 85", ended=True) == {"correct": 1.0, "formatted": 1.0}
    assert verify("47+38=", "7+8=15, 4+3+1=8. Answer: 84", ended=True) == {"correct": 0.0, "formatted": 1.0}
    assert verify("47+38=", "Answer: 85", ended=True)["correct"] == 1.0  # the worked steps are not required
    assert verify("07+05=", "7+5=12, 0+0+1=1. Answer: 12", ended=True)["correct"] == 1.0  # zero-padded problems


@pytest.mark.parametrize("response, why", [
    ("7+8=15, 4+3+1=8.", "no answer"),
    ("Answer: 85. Answer: 85", "two answers"),
    ("Answer: 85 because 7+8=15", "text after the answer"),
    ("Answer: 8 5", "a space inside the number"),
    ("Answer: 085", "a leading zero"),
    ("Answer: +85", "a plus sign"),
    ("Answer: 85.", "a full stop after the answer"),
    ("answer: 85", "the wrong case"),
    ("", "nothing"),
])
def test_a_malformed_answer_scores_0_and_is_not_formatted(response, why):
    assert verify("47+38=", response, ended=True) == {"correct": 0.0, "formatted": 0.0}, why


def test_whitespace_around_the_response_and_after_the_colon_is_allowed_and_a_sign_is_read():
    assert verify("47+38=", "  7+8=15.\nAnswer:   85 \n", ended=True)["correct"] == 1.0
    assert verify("47+38=", "Answer:85", ended=True)["correct"] == 1.0
    assert verify("47+38=", "Answer: -85", ended=True) == {"correct": 0.0, "formatted": 1.0}  # well-formed, wrong


def test_an_answer_cut_off_by_the_response_length_scores_0_even_if_its_digits_are_right():
    assert verify("47+38=", "7+8=15, 4+3+1=8. Answer: 85", ended=False) == {"correct": 0.0, "formatted": 0.0}


def test_the_verifier_refuses_what_is_not_an_addition_problem():
    with pytest.raises(ValueError, match="not an addition problem"):
        verify("47-38=", "Answer: 9", ended=True)


def test_check_answers_reads_each_response_up_to_its_eos_and_counts_one_without_eos_as_cut_off():
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "data" / "nano")
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    queries = torch.tensor([tokenizer.encode("47+38=")] * 3)
    texts = [" 7+8=15, 4+3+1=8. Answer: 85", " Answer: 84", " 7+8=15, 4+3+1=8. Answer: 85"]
    rows = [tokenizer.encode(t) + ([eos] if i < 2 else []) for i, t in enumerate(texts)]
    width = max(map(len, rows)) + 2
    responses = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    checks = train_policy.check_answers("arithmetic", queries, responses, tokenizer)
    assert checks["correct"].tolist() == [1.0, 0.0, 0.0] and checks["formatted"].tolist() == [1.0, 1.0, 0.0]


def test_worked_solutions_are_right_without_slips_and_wrong_after_one():
    rng = random.Random(0)
    for a, b in [(47, 38), (99, 99), (0, 0), (50, 50), (7, 3)]:
        solution = build.worked_solution(a, b, 2, 0.0, rng)
        assert verify(f"{a:02d}+{b:02d}=", solution, ended=True)["correct"] == 1.0, solution
        slipped = build.worked_solution(a, b, 2, 1.0, rng)  # every column's sum off by one
        assert verify(f"{a:02d}+{b:02d}=", slipped, ended=True) == {"correct": 0.0, "formatted": 1.0}, slipped
    assert build.worked_solution(47, 38, 2, 0.0, rng) == "7+8=15, 4+3+1=8. Answer: 85"
    assert build.worked_solution(99, 1, 2, 0.0, rng) == "9+1=10, 9+0+1=10, 1=1. Answer: 100"


def test_the_committed_task_is_what_the_build_stage_makes(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "ARITHMETIC", tmp_path)
    build.stage_arithmetic()
    for split, n in build.ARITHMETIC_SPLITS.items():
        made, committed = tmp_path / f"{split}.jsonl.gz", ROOT / "data" / "arithmetic" / f"{split}.jsonl.gz"
        assert gzip.open(made, "rt").read() == gzip.open(committed, "rt").read(), split
        assert len(gzip.open(made, "rt").read().splitlines()) == n
        # no time stamped in gzip's header (bytes 4-7), so that with the same zlib a rebuild writes the same bytes
        assert made.read_bytes()[4:8] == committed.read_bytes()[4:8] == bytes(4), split
    problems = [json.loads(line)["problem"] for split in build.ARITHMETIC_SPLITS
                for line in gzip.open(tmp_path / f"{split}.jsonl.gz", "rt")]
    assert len(set(problems)) == len(problems)  # the splits share no problem


def test_a_group_whose_samples_all_got_the_same_reward_counts_as_giving_no_gradient():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])  # k = 2: equal, equal, unequal, equal
    assert train_rloo.same_reward_share(rewards, 2).item() == 0.75
    assert train_rloo.grpo_advantages(rewards, 2).view(-1, 2)[[0, 1, 3]].abs().sum() == 0


@pytest.mark.parametrize("module, flags, message", [
    (train_rloo, ["--verifier", "arithmetic", "--reward_model", "x"], "replaces the reward model"),
    (train_policy, ["--verifier", "arithmetic", "--value_model", "reward"], "replaces the reward model"),
    (train_rloo, ["--verifier", "arithmetic"], "--verifier checks answers to problems"),
    (train_rloo, ["--query_dataset", "data/arithmetic/train.jsonl.gz", "--reward_model", "data/nano"],
     "need a --verifier"),
    (train_policy, ["--format_reward", "0.1", "--reward_model", "x"], "only a --verifier checks"),
    (train_rloo, ["--verifier", "arithmetic", "--query_dataset", "data/arithmetic/train.jsonl.gz", "--eval_dataset",
                  "data/tldr/validation.jsonl.gz"], "held-out problems are needed"),
])
def test_flags_that_clash_with_a_verifier_are_refused_in_one_line(module, flags, message, tmp_path, main):
    result = main(module, *flags, "--run_root", tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_sft_on_problems_needs_a_verifier(tmp_path, main):
    result = main(train_sft, "--task", "problems", "--dataset", "data/arithmetic/train.jsonl.gz", "--query_length",
                  "6", "--response_length", "32", "--run_root", tmp_path)
    assert result.returncode == 2 and "needs a --verifier" in result.stderr


TINY_TASK = ["--query_length", "6", "--response_length", "12", "--num_eval", "16", "--eval_every", "1"]


@pytest.mark.slow
def test_sft_on_problems_reports_pass_at_1(tmp_path, tiny_models, main):
    result = main(train_sft, "arithmetic", "--base_model", tiny_models / "base", "--total_steps", "2", "--batch_size",
                  "8", "--local_micro_batch_size", "8", "--output_dir", tmp_path / "model", "--run_root",
                  tmp_path / "runs", *TINY_TASK)
    assert result.returncode == 0, result.stderr
    last = [json.loads(line) for line in open(only_run(tmp_path / "runs") / "metrics.jsonl")][-1]
    assert 0 <= last["eval/pass@1"] <= last["eval/formatted"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("module, flags", [
    (train_rloo, ["--total_episodes", "32", "--batch_size", "16", "--k", "4", "--nminibatches", "1",
                  "--local_micro_batch_size", "16"]),
    (train_rloo, ["--advantage", "rloo", "--total_episodes", "32", "--batch_size", "16", "--k", "4", "--nminibatches",
                  "1", "--local_micro_batch_size", "16", "--format_reward", "0.1"]),
    (train_policy, ["--total_episodes", "32", "--batch_size", "16", "--nminibatches", "1", "--local_micro_batch_size",
                    "16"]),
])
def test_a_run_against_the_verifier_logs_pass_at_1_and_the_share_of_right_answers(module, flags, tmp_path,
                                                                                   tiny_models, main):
    """The arithmetic preset on a random tiny model: no reward model anywhere, pass@1 at update 0 and at every
    evaluation, the training answers' share right and well-formed, the score their sum (with the format reward)."""
    result = main(module, "arithmetic", "--base_model", tiny_models / "base", "--run_root", tmp_path, *TINY_TASK,
                  *flags)
    assert result.returncode == 0, result.stderr
    run = only_run(tmp_path)
    metrics = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert metrics[0]["update"] == 0 and "eval/pass@1" in metrics[0]
    updates = [m for m in metrics if "objective/correct" in m]
    assert len(updates) == 2 and all("eval/pass@1" in m for m in updates)
    format_reward = 0.1 if "--format_reward" in flags else 0.0
    for m in updates:
        assert m["objective/scores"] == pytest.approx(m["objective/correct"] + format_reward * m["objective/formatted"])
        assert ("objective/zero_gradient_share" in m) == (module is train_rloo)
    assert not (run / "reward_model").exists() and json.load(open(run / "args.json"))["reward_model"] is None


def test_pass_at_k_is_the_unbiased_estimate_of_chen_et_al():
    sys.path.insert(0, str(ROOT / "benchmark"))
    from pass_at_k import pass_at_k

    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3, 2) / C(4, 2)
    assert pass_at_k(64, 0, 64) == 0.0 and pass_at_k(64, 1, 64) == 1.0 and pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the share right
    n, c, k = 6, 2, 3  # against the chance that k answers drawn without replacement hold a right one, by enumeration
    draws = list(itertools.combinations(range(n), k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(i < c for i in d) for d in draws) / len(draws))
