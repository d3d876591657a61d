"""The docs and the code's form: the site builds with no broken link or anchor (mkdocs build --strict), every metric a
script writes to metrics.jsonl is explained on that script's page, and ruff finds no line over 120 characters and no
unused or undefined name."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT, TINY, TINY_RLOO, in_process, only_run

import train_dpo
import train_policy
import train_reward
import train_rloo
import train_sft

PAGES = {train_policy: "ppo.md", train_reward: "reward-model.md", train_dpo: "dpo.md", train_rloo: "rloo.md",
         train_sft: "sft.md"}
# keys whose last part is a value of the data (a split, a batch, a confidence): the page documents the prefix
BREAKDOWNS = re.compile(r"^(test/accuracy/(split|batch|confidence)/).+$")


def test_the_site_builds_with_no_broken_link_or_anchor(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "ppo" / "index.html").is_file()


def test_ruff_finds_no_long_line_and_no_unused_or_undefined_name():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "E501,F", "--line-length", "120", "."],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]


def logged_names(run_root: Path) -> set:
    """Every key of every line of the run's metrics.jsonl, a data-dependent breakdown key as its prefix."""
    names = set()
    for line in open(only_run(run_root) / "metrics.jsonl"):
        for key in json.loads(line):
            match = BREAKDOWNS.match(key)
            names.add(match.group(1) if match else key)
    return names


def tiny_runs(module, tiny_models: Path, tmp_path: Path) -> list:
    """The tiny configurations of a script that, together, log every metric it can log on a CPU (memory/peak_gb is
    CUDA's)."""
    base, rm, tldr = str(tiny_models / "base"), str(tiny_models / "reward_model"), str(FIXTURES / "tldr_train.jsonl")
    ppo = ["--total_episodes", "16", "--batch_size", "16", "--nminibatches", "1", "--local_micro_batch_size", "8",
           "--base_model", base, "--reward_model", rm]
    tldr_query = ["--query_dataset", tldr, "--eval_dataset", tldr, "--num_eval", "4", "--eval_every", "1",
                  "--query_length", "160", "--response_length", "8", "--truncate_token", "eos", "--truncate_after", "0",
                  "--gold_labeler", "tldr_judge"]
    return {
        train_policy: [[*ppo, "--truncate_token", ".", "--truncate_after", "4", "--peak_flops", "1e11"],
                       [*ppo, *tldr_query]],
        train_reward: [["--num_train", "16", "--num_test", "8", "--batch_size", "8", "--local_micro_batch_size", "4",
                        "--normalize_samples", "16", "--rollout_batch_size", "16", "--eval_every", "1", "--base_model",
                        base],
                       ["--label_dataset", str(FIXTURES / "oai_comparisons.jsonl"), "--num_train", "2", "--num_test",
                        "4", "--batch_size", "2", "--local_micro_batch_size", "1", "--query_length", "96",
                        "--no_normalize_before", "--no_normalize_after", "--base_model", base]],
        train_dpo: [["--num_train", "16", "--num_test", "8", "--batch_size", "16", "--local_micro_batch_size", "8",
                     "--num_eval", "8", "--eval_every", "1", "--base_model", base, "--reward_model", rm]],
        train_rloo: [[*TINY_RLOO, "--advantage", advantage, "--base_model", base, "--reward_model", rm]
                     for advantage in ("rloo", "grpo", "dr_grpo", "best_of_n")],
        train_sft: [[*TINY, "--total_steps", "2", "--batch_size", "4", "--local_micro_batch_size", "4", "--dataset",
                     str(ROOT / "data" / "corpus.jsonl.gz")],
                    ["--task", "tldr", "--base_model", base, "--dataset", tldr, "--query_length", "160",
                     "--response_length", "16", "--eval_fraction", "0.25", "--total_steps", "2", "--batch_size", "4",
                     "--local_micro_batch_size", "2", "--eval_every", "2", "--num_samples", "1", "--sample_length",
                     "4", "--mixed_precision", "no"]],
    }[module]


@pytest.mark.slow
@pytest.mark.parametrize("module", list(PAGES), ids=[m.__name__ for m in PAGES])
def test_every_logged_metric_is_explained_on_its_page(module, tiny_models, tmp_path):
    page = (ROOT / "docs" / PAGES[module]).read_text()
    names = set()
    for i, flags in enumerate(tiny_runs(module, tiny_models, tmp_path)):
        r = in_process(module, *flags, "--run_root", tmp_path / str(i))
        assert r.returncode == 0, r.stderr[-3000:]
        names |= logged_names(tmp_path / str(i))
    missing = sorted(name for name in names if f"`{name}" not in page)
    assert not missing, f"docs/{PAGES[module]} does not explain {missing}"
