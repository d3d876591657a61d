"""What the tests share: the embedded world's paths, tiny models and runs built once per session (once for all
pytest-xdist workers: the first worker to need one builds it under a file lock), a script run in the test's own process
(`main`) or in a new interpreter (`run_script`), and the slow tests scheduled first."""

import contextlib
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.state import AcceleratorState
from filelock import FileLock

# The embedded world must work with no model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIXTURES = Path(__file__).resolve().parent / "fixtures"
NANO = ROOT / "data" / "nano"
CORPUS = ROOT / "data" / "corpus.jsonl.gz"
LABELS = ROOT / "data" / "labels" / "sentiment_offline_5k.json"

# A tiny GPT-2 for fast SFT runs; the real nano tokenizer.
TINY = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "32", "--eval_every", "2",
        "--num_samples", "2", "--sample_length", "4", "--mixed_precision", "no"]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # each of the workers (one per core) computes on one thread, as every script a test launches does
    # (OMP_NUM_THREADS=1)
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """Slow tests first, and the two-process ones (test_distributed.py) before them: pytest-xdist gives each file to one
    worker (--dist loadfile), so the worker that takes test_distributed.py runs its launches one after the other while
    the other worker runs the rest; the workers' last tests are short ones."""
    items.sort(key=lambda item: (item.path.name != "test_distributed.py", item.get_closest_marker("slow") is None))


def run_script(args: list, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def in_process(module, *argv) -> SimpleNamespace:
    """`python <script> <argv>` in this process (no interpreter to start: a second instead of five): returns returncode,
    stdout and stderr as run_script's result does. An exception that is not SystemExit propagates, so a test that
    expects exit 2 also proves that no traceback was printed. It runs where run_script's processes run (the defaults'
    relative paths, data/nano and others, start there) and computes on one thread, as they do, so that the two run the
    same kernels and their results can be compared bit for bit."""
    import train_both
    import train_policy

    cli = train_policy.cli if module is train_both else module.cli  # as each script's `if __name__ == "__main__":`
    saved_argv, cwd, threads = sys.argv, os.getcwd(), torch.get_num_threads()
    sys.argv = [Path(module.__file__).name, *map(str, argv)]
    os.chdir(ROOT)
    torch.set_num_threads(1)
    AcceleratorState._reset_state()  # a new process starts without one (--mixed_precision may differ)
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.train(cli(module.Args, module.PRESETS, module.__doc__))
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:
        AcceleratorState._reset_state()
        sys.argv = saved_argv
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture
def main():
    """in_process, for a test: main(train_policy, "--seed", 2)."""
    return in_process


def read_metrics(run_root: Path) -> list:
    (run_dir,) = [p for p in run_root.iterdir() if p.is_dir()]
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def only_run(root: Path) -> Path:
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    return run_dir


VOLATILE = ("timing/", "throughput/", "memory/")  # wall-clock figures, different in every run


def stable(path: Path) -> list:
    """metrics.jsonl without its wall-clock figures."""
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(VOLATILE)} for line in open(path)]


def weights(folder: Path) -> dict:
    """The bytes of a model folder's weight files."""
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.safetensors"))}


def stopped_midway(cmd: list, root: Path, metrics: str, after_lines: int) -> subprocess.CompletedProcess:
    """Start cmd in its own process group and send SIGTERM to the whole group (as a scheduler pre-empting a job does)
    once root/<run>/<metrics> has after_lines lines. The run stops after the update it is in, or a later one if that
    one ended before the signal came: a test leaves it a few updates more."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        files = list(root.glob(f"*/{metrics}"))
        if files and sum(1 for _ in open(files[0])) >= after_lines:
            os.killpg(proc.pid, signal.SIGTERM)
            break
        time.sleep(0.01)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def shared(tmp_path_factory, name: str, build) -> Path:
    """A folder built once for the whole session, whichever xdist worker asks first: build(folder) runs under a file
    lock in the session's common temporary folder, and later callers, in any worker, find it done."""
    base = tmp_path_factory.getbasetemp()
    common = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = common / name
    with FileLock(str(common / f"{name}.lock")):
        if not (folder / ".built").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """The first 300 passages of the embedded corpus, in the same format."""
    def build(folder):
        with gzip.open(CORPUS, "rt") as src, gzip.open(folder / "small.jsonl.gz", "wt") as dst:
            for i, line in enumerate(src):
                if i == 300:
                    break
                dst.write(line)

    return shared(tmp_path_factory, "small_corpus", build) / "small.jsonl.gz"


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory) -> Path:
    """The reward model of a tiny train_reward.py run under LoRA (rank 4 on the nano model): train_reward.py's LoRA
    path, and the reward model of the PPO, RLOO, DPO, LoRA, best-of-n and DeepSpeed tests."""
    def build(folder):
        import train_reward

        r = in_process(train_reward, "--num_train", "16", "--num_test", "8", "--batch_size", "8",
                       "--local_micro_batch_size", "4", "--normalize_samples", "16", "--rollout_batch_size", "16",
                       "--eval_every", "1", "--lora_r", "4", "--run_root", folder)
        assert r.returncode == 0, r.stderr[-3000:]

    return only_run(shared(tmp_path_factory, "tiny_reward", build)) / "reward_model"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """A random 1-layer GPT-2 (32 wide, 256 positions) on the nano tokenizer, saved as base/, and a reward model made
    from it, saved as reward_model/: runs of a few seconds for the tests whose point is not what the nano model learns
    (resume, compile, bf16, the TL;DR details)."""
    def build(folder):
        import train_policy as tp
        from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

        tokenizer = AutoTokenizer.from_pretrained(NANO)
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=1, n_head=2,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=0, eos_token_id=0)
        lm, tokenizer = tp.prepare_lm(GPT2LMHeadModel(config), tokenizer)
        lm.save_pretrained(folder / "base")
        tokenizer.save_pretrained(folder / "base")
        tp.save_reward_model(tp.RewardModel(lm), tokenizer, folder / "reward_model")

    return shared(tmp_path_factory, "tiny_models", build)


# The tiny runs that several tests make, as flags (each script's own, or train_both.py's --reward.* / --policy.*) -----

TINY_BOTH = [
    "--reward.num_train", "16", "--reward.num_test", "8", "--reward.batch_size", "8",
    "--reward.local_micro_batch_size", "4", "--reward.normalize_samples", "16", "--reward.rollout_batch_size", "16",
    "--reward.eval_every", "1", "--policy.total_episodes", "32", "--policy.batch_size", "16", "--policy.nminibatches",
    "1", "--policy.local_micro_batch_size", "8", "--policy.noptepochs", "2", "--policy.print_sample_every", "1",
]
TINY_RLOO = ["--total_episodes", "32", "--batch_size", "16", "--k", "4", "--nminibatches", "2",
             "--local_micro_batch_size", "4", "--noptepochs", "2", "--print_sample_every", "100",
             "--local_rollout_forward_batch_size", "8"]


def long_both(tiny_models: Path) -> list:
    """A tiny pipeline on the 1-layer model to stop and resume: 8 reward updates, then 6 PPO updates, checkpoints every
    2 of each."""
    base = str(tiny_models / "base")
    return [
        "--reward.num_train", "64", "--reward.num_test", "8", "--reward.batch_size", "8",
        "--reward.local_micro_batch_size", "4", "--reward.normalize_samples", "16", "--reward.rollout_batch_size",
        "16", "--reward.eval_every", "1", "--reward.save_every", "2", "--reward.base_model", base,
        "--policy.base_model", base, "--policy.total_episodes", "96", "--policy.batch_size", "16",
        "--policy.nminibatches", "1", "--policy.local_micro_batch_size", "8", "--policy.noptepochs", "2",
        "--policy.print_sample_every", "1", "--policy.save_every", "2", "--policy.keep_checkpoints", "2",
    ]


def long_rloo(tiny_models: Path) -> list:
    """GRPO on the 1-layer model to stop and resume: 6 updates, a checkpoint every 2."""
    return [*TINY_RLOO, "--total_episodes", "96", "--save_every", "2", "--advantage", "grpo", "--base_model",
            str(tiny_models / "base"), "--reward_model", str(tiny_models / "reward_model")]


def zero_runs(tiny_models: Path, small_corpus: Path) -> dict:
    """name -> [script, flags]: each script's tiny run that test_distributed.py compares across ZeRO stages. The 1-layer
    model is the base model of the reward model, PPO, RLOO and DPO runs (and its reward model theirs); RLOO runs under
    SFD's mask, so its output layer's hook (output_rows) runs inside the DDP and DeepSpeed forwards (the random model
    rarely samples the '.', so the mask keeps about every token: test_rloo.py checks a ragged one); DPO comes last
    (test_distributed.py)."""
    tiny = ["--base_model", str(tiny_models / "base")]
    rm = ["--reward_model", str(tiny_models / "reward_model")]
    return {
        "policy": ["train_policy.py",
                   ["--total_episodes", "32", "--batch_size", "16", "--nminibatches", "1", "--local_micro_batch_size",
                                       "4", "--noptepochs", "2", "--print_sample_every", "100", *tiny, *rm]],
        "reward": ["train_reward.py",
                   ["--num_train", "32", "--num_test", "8", "--batch_size", "8", "--local_micro_batch_size", "2",
                                       "--normalize_samples", "16", "--rollout_batch_size", "16", "--eval_every", "1",
                                       *tiny]],
        "rloo": ["train_rloo.py", ["--total_episodes", "32", "--batch_size", "16", "--k", "4", "--nminibatches", "2",
                                   "--local_micro_batch_size", "4", "--advantage", "grpo", "--print_sample_every",
                                   "100", "--truncate_token", ".", "--truncate_after", "2", "--mask_after_truncate",
                                   *tiny, *rm]],
        "sft": ["train_sft.py", [*TINY, "--total_steps", "3", "--batch_size", "8", "--local_micro_batch_size", "2",
                                 "--max_grad_norm", "0.5", "--dataset", str(small_corpus)]],
        "dpo": ["train_dpo.py",
                ["--num_train", "32", "--num_test", "6", "--batch_size", "16", "--local_micro_batch_size", "4",
                                 "--num_eval", "6", "--eval_every", "1", "--local_rollout_forward_batch_size", "8",
                                 "--lora_r", "4", *tiny, *rm]],
    }


def launch(command: list, stage: int, port: int) -> list:
    """A 2-process launch of command (a script and its flags): torchrun (plain DDP, stage 0) or accelerate launch with
    configs/zero<stage>.yaml."""
    if stage == 0:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    else:
        head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs" / f"zero{stage}.yaml"), "--num_processes", "2", "--main_process_port", str(port)]
    return [*head, *command]


def several(runs: dict, folder: Path, stage: int, port: int) -> list:
    """The command of one 2-process launch that makes the runs (name -> [script, flags]) one after the other in the same
    processes (tests/launch_several.py), each into folder/<name>: torch, transformers and DeepSpeed start once, not once
    a run."""
    runs = json.dumps([[script, [*flags, "--run_root", str(folder / name)]] for name, (script, flags) in runs.items()])
    return launch(["tests/launch_several.py", runs], stage, port)


def launch_several(runs: dict, folder: Path, stage: int, port: int):
    r = run_script(several(runs, folder, stage, port), timeout=600)
    assert r.returncode == 0, f"stage {stage}: {r.stderr[-3000:]}"


@pytest.fixture(scope="session")
def two_process_runs(tmp_path_factory, tiny_models, small_corpus) -> Path:
    """Every run the suite makes in two processes under plain DDP (torchrun), in one launch: the references of the
    ZeRO-2/3 runs (zero_runs), train_both.py at near-greedy temperature and a first SFT step (each against one process),
    and the uninterrupted runs that 2-process runs stopped and resumed must end as (train_both.py, GRPO)."""
    runs = {
        **{f"zero_ref/{name}": run for name, run in zero_runs(tiny_models, small_corpus).items() if name != "dpo"},
        "both_near_greedy": ["train_both.py",
                             [*TINY_BOTH, "--reward.temperature", "0.001", "--policy.temperature", "0.001"]],
        "sft_first_step": ["train_sft.py",
                           [*TINY, "--dataset", str(small_corpus), "--total_steps", "2", "--batch_size", "8",
                                            "--local_micro_batch_size", "4"]],
        "both_long": ["train_both.py", long_both(tiny_models)],
        "rloo_long": ["train_rloo.py", long_rloo(tiny_models)],
        "zero_ref/dpo": zero_runs(tiny_models, small_corpus)["dpo"],
    }
    return shared(tmp_path_factory, "two_process_runs", lambda folder: launch_several(runs, folder, 0, 29650))

