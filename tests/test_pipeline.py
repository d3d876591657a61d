"""train_both.py end to end on tiny settings, two processes vs one, wandb offline, presets, copies, every flag."""

import ast
import json
import re
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT, TINY_BOTH, only_run, run_script

import train_both
import train_dpo
import train_policy
import train_reward
import train_rloo

POLICY_METRICS = [
    "objective/scores", "objective/gold_score", "objective/kl", "objective/entropy", "objective/score_total",
    "objective/kl_coef", "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total", "ppo/policy/approxkl",
    "ppo/policy/clipfrac", "ppo/policy/entropy", "ppo/val/vpred", "ppo/val/error", "ppo/val/clipfrac", "ppo/val/mean",
    "ppo/val/var", "ppo/returns/mean", "ppo/returns/var", "timing/generation_s", "timing/scoring_s", "timing/update_s",
    "throughput/episodes_per_s", "episode", "update", "throughput/update_flops_per_s",
    "throughput/update_peak_fraction",
]


def read(run_dir: Path, stage: str) -> list:
    return [json.loads(line) for line in open(run_dir / stage / "metrics.jsonl")]


@pytest.mark.slow
def test_train_both_end_to_end_with_wandb_offline(tmp_path):
    # truncation at '.' after 4 tokens and the -1 penalty are on here (the embedded default keeps responses whole)
    r = run_script([sys.executable, "train_both.py", *TINY_BOTH, "--policy.truncate_token", ".",
                    "--policy.truncate_after", "4", "--policy.peak_flops", "1e11", "--run_root", str(tmp_path),
                    "--track"], {"WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = only_run(tmp_path)
    reward, policy = read(run_dir, "reward"), read(run_dir, "policy")
    # reward stage: normalization before/after, accuracies, lr annealed linearly to 0 over the epoch
    assert "normalize/before_training/std" in reward[0] and "test/accuracy" in reward[0]
    assert "normalize/after_training/mean" in reward[-1] and "reward/gain" in reward[-1]
    lrs = [m["train/lr"] for m in reward if "train/lr" in m]
    assert lrs == pytest.approx([train_reward.Args().lr * (1 - i * 8 / 16) for i in range(2)])
    assert all("train/accuracy" in m and "train/loss" in m for m in reward if "train/lr" in m)
    # policy stage: every metric DESIGN.md names, once per update; lr annealed; the reward model it used
    assert [m["update"] for m in policy] == [1, 2] and [m["episode"] for m in policy] == [16, 32]
    for name in POLICY_METRICS:
        assert all(name in m for m in policy), name
    assert [m["lr"] for m in policy] == pytest.approx([train_policy.Args().lr, train_policy.Args().lr / 2])
    assert policy[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    peak_fraction = policy[0]["throughput/update_flops_per_s"] / 1e11
    assert policy[0]["throughput/update_peak_fraction"] == pytest.approx(peak_fraction)
    args = json.loads((run_dir / "policy" / "args.json").read_text())
    assert args["reward_model"] == str(run_dir / "reward" / "reward_model")
    assert (run_dir / "reward" / "reward_model" / "reward_head.safetensors").is_file()
    assert (run_dir / "policy" / "policy" / "value_head.safetensors").is_file()
    samples = json.loads((run_dir / "policy" / "samples.json").read_text())
    assert {"query", "response", "score", "gold_score", "kl"} <= set(samples[0])
    assert "samples at update 1" in r.stdout and "gold" in r.stdout
    # wandb offline: each stage's run lies in its folder
    for stage in ("reward", "policy"):
        assert list((run_dir / stage / "wandb").glob("offline-run-*")), stage


def test_train_both_checks_that_the_stages_share_the_task(tmp_path, main):
    r = main(train_both, "--reward.query_length", "16", "--run_root", tmp_path)
    assert r.returncode == 2
    assert "--reward.query_length 16 and --policy.query_length 32 differ" in r.stderr
    assert not list(tmp_path.iterdir())


def test_policy_needs_a_reward_model_folder(tmp_path, main):
    r = main(train_policy, "--reward_model", tmp_path / "nope", "--run_root", tmp_path)
    assert r.returncode == 2 and "--reward_model" in r.stderr.splitlines()[-1]
    r = main(train_policy, "--reward_model", tmp_path, "--batch_size", "12", "--run_root", tmp_path)
    assert r.returncode == 2 and "--batch_size 12" in r.stderr.splitlines()[-1]


def test_query_dataset_in_oai_book_passages_format():
    from transformers import AutoTokenizer

    texts = train_policy.load_texts(str(FIXTURES / "book_passages.jsonl"), "train")
    assert texts[0].startswith("The bus was late again.")
    tok = AutoTokenizer.from_pretrained(ROOT / "data" / "nano")
    batch, references = next(train_policy.query_batches(texts, tok, 24, 8, 4, seed=1))
    assert batch.shape == (4, 24) and (batch[:, -1] == tok.convert_tokens_to_ids(".")).all() and references is None
    # a hub dataset with a "text" column (bookcorpus's layout) gives the same queries
    import datasets

    # what load_texts returns
    hub_like = datasets.Dataset.from_dict({"text": texts, "other": list(range(len(texts)))})["text"]
    assert next(train_policy.query_batches(hub_like, tok, 24, 8, 4, seed=1))[0].tolist() == batch.tolist()


# presets: OAI's launch.py, as transcribed in DESIGN.md's table ------------------------------------------------------

DESIGN_TABLE = {  # DESIGN.md, "Presets", column "sentiment / descriptiveness"
    "query_length": 64, "response_length": 24, "truncate_token": ".", "truncate_after": 16, "temperature": 0.7,
    "reward_lr": 5e-5, "reward_batch_size": 32, "num_train": 4992, "policy_lr": 1e-5, "policy_batch_size": 512,
    "total_episodes": 1_000_000, "kl_coef": 0.15, "adaptive_kl": True, "kl_target": 6.0, "kl_horizon": 10000,
    "noptepochs": 4, "nminibatches": 1, "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1, "gamma": 1.0,
    "lam": 0.95,
}


@pytest.mark.parametrize("name", ["sentiment", "descriptiveness"])
def test_presets_equal_oai_launch_values(name):
    both = train_both.PRESETS[name]
    r, p = both["reward"], both["policy"]
    t = DESIGN_TABLE
    assert (p.query_length, p.response_length, p.truncate_token, p.truncate_after, p.temperature) == (
        t["query_length"], t["response_length"], t["truncate_token"], t["truncate_after"], t["temperature"])
    assert (r.query_length, r.response_length, r.temperature) == (t["query_length"], t["response_length"],
                                                                  t["temperature"])
    assert (r.lr, r.batch_size, r.num_train) == (t["reward_lr"], t["reward_batch_size"], t["num_train"])
    assert (p.lr, p.batch_size, p.total_episodes) == (t["policy_lr"], t["policy_batch_size"], t["total_episodes"])
    assert (p.kl_coef, p.adaptive_kl, p.kl_target, p.kl_horizon) == (t["kl_coef"], t["adaptive_kl"], t["kl_target"],
                                                                     t["kl_horizon"])
    for k in ("noptepochs", "nminibatches", "cliprange", "cliprange_value", "vf_coef", "gamma", "lam"):
        assert getattr(p, k) == t[k], k
    assert p.base_model == r.base_model == "gpt2" and p.query_dataset == r.query_dataset == "bookcorpus"
    assert r.label_dataset == f"vwxyzjn/lm-human-preferences/{name}/offline_5k.json"
    assert (r.normalize_before, r.normalize_after, r.normalize_samples, r.rollout_batch_size) == (True, True, 256, 512)
    assert p.batch_size // 8 % (p.nminibatches * p.local_micro_batch_size) == 0  # the 8-process layout divides
    assert r.batch_size % (8 * r.local_micro_batch_size) == 0


# DESIGN.md, "Presets", column "tldr (SFD)", checked against SFD's scripts (links in the presets' comments)
SFD_TABLE = {
    "query_length": 512, "response_length": 53, "temperature": 0.7, "reward_lr": 3e-6, "reward_batch_size": 64,
    "num_train": 92832, "policy_lr": 3e-6, "policy_batch_size": 512, "total_episodes": 1_000_000, "kl_coef": 0.05,
    "noptepochs": 4, "nminibatches": 1, "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1, "gamma": 1.0,
    "lam": 0.95,
}


def test_tldr_presets_equal_sfd_1b_recipe():
    import train_sft

    both = train_both.PRESETS["tldr"]
    r, p, t = both["reward"], both["policy"], SFD_TABLE
    assert (p.query_length, p.response_length, p.temperature) == (t["query_length"], t["response_length"],
                                                                  t["temperature"])
    assert (p.truncate_token, p.truncate_after, p.penalty_reward_value) == ("eos", 0, -1.0)  # the EOS trick
    assert (r.lr, r.batch_size, r.num_train, r.lr_schedule, r.optimizer) == (t["reward_lr"], t["reward_batch_size"],
                                                                             t["num_train"], "cosine", "adamw")
    assert (r.query_length, r.response_length, r.reference_bias, r.normalize_before,
            r.normalize_after) == (512, 169, True, False, False)
    assert (p.lr, p.batch_size, p.total_episodes, p.optimizer) == (t["policy_lr"], t["policy_batch_size"],
                                                                   t["total_episodes"], "adamw")
    assert (p.kl_coef, p.adaptive_kl, p.whiten_rewards, p.value_model, p.mask_after_truncate) == (t["kl_coef"], False,
                                                                                                  False, "reward", True)
    for k in ("noptepochs", "nminibatches", "cliprange", "cliprange_value", "vf_coef", "gamma", "lam"):
        assert getattr(p, k) == t[k], k
    assert p.eval_temperature == 0.01 and p.eval_split == "validation"
    tldr_posts = "vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144"
    assert p.query_dataset == r.query_dataset == tldr_posts
    assert r.label_dataset == "vwxyzjn/summarize_from_feedback_oai_preprocessing_1706381144"
    assert r.test_split == "validation"
    # 8 GPUs x micro-batch 16 x 4 accumulation, as SFD's sbatch
    assert p.batch_size // 8 == 4 * p.local_micro_batch_size
    sft = train_sft.PRESETS["tldr"]
    assert (sft["lr"], sft["batch_size"], sft["lr_schedule"], sft["warmup_steps"],
            sft["total_steps"]) == (3e-6, 128, "cosine", 0, 116722 // 128)
    assert (sft["query_length"], sft["response_length"], sft["train_on_query"], sft["eval_temperature"]) == (512, 53,
                                                                                                             True, 0.01)
    assert p.base_model == r.base_model == sft["output_dir"]  # PPO and the reward model start from the SFT model


def test_preset_word_picks_values_and_flags_still_override(main):
    out = main(train_policy, "sentiment", "--seed", "7", "--help")
    assert out.returncode == 0 and "gpt2" in out.stdout and "1000000" in out.stdout
    bad = main(train_policy, "sentimint")
    assert bad.returncode == 2 and "unknown preset 'sentimint'" in bad.stderr


# copies and flags ---------------------------------------------------------------------------------------------------


def top_level_sources(path: Path) -> dict:
    """name -> (source, the script it says it was copied from, or None) of every top-level function, class and constant
    (an upper-case name)."""
    source = path.read_text()
    tree = ast.parse(source)
    lines = source.splitlines()
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign)):
            start = (node.decorator_list[0].lineno if getattr(node, "decorator_list", None) else node.lineno) - 1
            marker = re.fullmatch(r"# Copied from (train_\w+\.py)", lines[start - 1].strip())
            name = getattr(node.targets[0], "id", "") if isinstance(node, ast.Assign) else node.name
            if not isinstance(node, ast.Assign) or name.isupper():
                out[name] = ("\n".join(lines[start : node.end_lineno]), marker and marker.group(1))
    return out


def test_copies_of_helpers_are_identical_to_their_originals():
    originals = {name: top_level_sources(ROOT / name) for name in ("train_policy.py", "train_reward.py")}
    n = 0
    for script in ("train_policy.py", "train_reward.py", "train_sft.py", "train_dpo.py", "train_rloo.py"):
        for name, (source, origin) in top_level_sources(ROOT / script).items():
            if origin:
                assert source == originals[origin][name][0], f"{script}: {name} differs from {origin}"
                assert not originals[origin][name][1], f"{script}: {name} is copied from a copy"
                n += 1
            # constants (PRESETS, ...) may differ; a marked one may not
            elif script != "train_policy.py" and not name.isupper():
                # an unmarked name of this script is in train_policy.py only as a marked copy of it (RewardModel)
                in_policy = originals["train_policy.py"].get(name)
                assert in_policy is None or in_policy[1] == script or name in ("train", "Args", "check_args",
                                                                               "summarize", "print_samples"), \
                    f"{script}: {name} is a copy without its marker"
    assert n >= 60


@pytest.mark.parametrize("module", [train_reward, train_policy, train_both, train_dpo, train_rloo])
def test_every_argument_is_documented_and_read(module, main):
    script = Path(module.__file__).name
    help_text = main(module, "--help").stdout
    source = (ROOT / script).read_text()
    for name in module.Args.__dataclass_fields__:
        assert f"--{name}" in help_text or f"--{name}." in help_text, name
        assert f"args.{name}" in source, f"{script}: --{name} is never read"
