"""train_sft.py: loss goes down, checkpoints load, multi-process equivalence, TL;DR format, clear errors."""
import gzip
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import train_sft
from conftest import FIXTURES, NANO, TINY, read_metrics

TLDR = FIXTURES / "tldr_train.jsonl"


def test_few_steps_lower_the_loss_and_checkpoint_loads(small_corpus, tmp_path):
    args = train_sft.Args(
        dataset=str(small_corpus), tokenizer=str(NANO), run_root=str(tmp_path), total_steps=12, warmup_steps=2, lr=1e-2,
        batch_size=8, local_micro_batch_size=4, n_layer=1, n_embd=32, n_head=2, block_size=32, eval_every=6,
        num_samples=2, sample_length=4, mixed_precision="no", output_dir=str(tmp_path / "out"),
    )
    run_dir = train_sft.train(args)
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert len(metrics) == 12
    assert metrics[-1]["train/loss"] < metrics[0]["train/loss"] - 0.5
    evals = [m["eval/loss"] for m in metrics if "eval/loss" in m]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert json.loads((run_dir / "args.json").read_text())["total_steps"] == 12
    assert len(json.loads((run_dir / "samples.json").read_text())) == 2
    for folder in (run_dir / "model", tmp_path / "out"):
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        assert model.config.n_layer == 1 and tok.pad_token_id == AutoTokenizer.from_pretrained(NANO).pad_token_id


def test_lr_schedule_warms_up_and_decays_to_zero():
    f = train_sft.lr_lambda
    assert f(0, 10, 100, "cosine") == pytest.approx(0.1)
    assert f(9, 10, 100, "cosine") == pytest.approx(1.0)
    assert f(10, 10, 100, "cosine") == pytest.approx(1.0)
    assert f(55, 10, 100, "linear") == pytest.approx(0.5)
    assert f(55, 10, 100, "cosine") == pytest.approx(0.5)
    assert f(100, 10, 100, "linear") == f(100, 10, 100, "cosine") == pytest.approx(0.0)


def test_tldr_query_format_truncation_and_padding():
    tok = AutoTokenizer.from_pretrained(NANO)
    row = json.loads(TLDR.read_text().splitlines()[0])
    q = train_sft.format_tldr_query(row, tok, 400)
    assert len(q) == 400 and q[0] == tok.pad_token_id
    text = tok.decode([t for t in q if t != tok.pad_token_id])
    assert text.startswith("SUBREDDIT: r/relationships\n\nTITLE: My [24F]") and text.endswith("\n\nTL;DR:")
    assert row["post"] in text
    full = len([t for t in q if t != tok.pad_token_id])
    short = train_sft.format_tldr_query(row, tok, full - 5)  # too long by 5 tokens: the post loses its last line
    text = tok.decode([t for t in short if t != tok.pad_token_id])
    assert "How do I bring this up" not in text and "not a priority." in text and text.endswith("\n\nTL;DR:")


def test_tldr_labels_cover_only_the_summary():
    tok = AutoTokenizer.from_pretrained(NANO)
    rows = [json.loads(line) for line in TLDR.read_text().splitlines()]
    data = train_sft.tldr_examples(rows, tok, 160, 40)
    assert data.shape == (len(rows), 200)
    batch = train_sft.inputs_and_labels(data, tok.pad_token_id, 160)
    labels = batch["labels"][0]
    assert (labels[:160] == -100).all()
    summary = labels[labels != -100]
    assert tok.decode(summary) == " " + rows[0]["summary"] + tok.eos_token
    # left padding: the first real token sits at position 0
    first = int(batch["attention_mask"][0].argmax())
    assert batch["position_ids"][0, first] == 0 and batch["position_ids"][0, -1] == batch["attention_mask"][0].sum() - 1


def test_tldr_sft_from_a_local_base_model(tmp_path, main):
    out = main(train_sft, "--task", "tldr", "--base_model", NANO, "--dataset", TLDR, "--query_length", "160",
               "--response_length", "40", "--eval_fraction", "0.25", "--total_steps", "3", "--batch_size", "4",
               "--local_micro_batch_size", "2", "--eval_every", "3", "--num_samples", "1", "--sample_length", "4",
               "--mixed_precision", "no", "--run_root", tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = read_metrics(tmp_path)
    assert len(metrics) == 3 and metrics[-1]["eval/perplexity"] > 1
    # ROUGE of held-out summaries at the evaluation temperature, at the end
    assert all(0 <= metrics[-1][f"eval/{k}"] <= 1 for k in ("rouge1", "rouge2",
                                                            "rougeL")) and "eval/rougeL" not in metrics[0]
    assert "rougeL" in out.stdout


def _garbled_gzip(path):
    path.write_bytes(b"\x1f\x8b\x08\x00not really gzip")
    return path


def _garbled_json(path):
    with gzip.open(path, "wt") as f:
        f.write('{"text": "fine"}\n{"text": broken\n')
    return path


def _missing_key(path):
    with gzip.open(path, "wt") as f:
        f.write('{"passage": "no text key"}\n')
    return path


def _empty(path):
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("make, problem", [
    (lambda p: p, "file not found"),
    (_garbled_gzip, "cannot be read"),
    (_garbled_json, "line 2 is not valid JSON"),
    (_missing_key, "lacks the string field(s) text"),
    (_empty, "no examples in the file"),
])
def test_bad_dataset_ends_with_one_clear_line(tmp_path, make, problem, main):
    path = make(tmp_path / "corpus.jsonl.gz")
    out = main(train_sft, *TINY, "--dataset", path, "--run_root", tmp_path / "runs")
    assert out.returncode == 2
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: {path}") and problem in lines[-1]
    assert not (tmp_path / "runs").exists()  # nothing written


def test_missing_base_model_and_bad_batch_are_clear(tmp_path, main):
    out = main(train_sft, "--base_model", tmp_path / "nope", "--run_root", tmp_path)
    assert out.returncode == 2 and "--base_model" in out.stderr
    out = main(train_sft, "--batch_size", "10", "--local_micro_batch_size", "4", "--run_root", tmp_path)
    assert out.returncode == 2 and "--batch_size 10" in out.stderr.strip().splitlines()[-1]


def test_every_argument_is_documented_and_read(main):
    help_text = main(train_sft, "--help").stdout
    source = open(train_sft.__file__).read()
    for name in train_sft.Args.__dataclass_fields__:
        assert f"--{name}" in help_text
        assert f"args.{name}" in source, f"--{name} is never read"
    assert help_text.count("(default:") >= len(train_sft.Args.__dataclass_fields__)


def test_sft_on_query_puts_the_loss_on_the_query_too():
    """SFD's SFT loss covers query and summary (--train_on_query); OAI's only the summary."""
    pad = 1
    # query of 4 (left-padded), response of 4
    batch = torch.tensor([[pad, pad, 5, 6, 7, 8, 9, pad], [3, 4, 5, 6, 7, 8, 9, 2]])
    summary_only = train_sft.inputs_and_labels(batch, pad, query_length=4)["labels"]
    everything = train_sft.inputs_and_labels(batch, pad, query_length=0)["labels"]
    assert (summary_only[:, :4] == -100).all() and summary_only[0, 4:].tolist() == [7, 8, 9, -100]
    assert everything[0].tolist() == [-100, -100, 5, 6, 7, 8, 9, -100] and everything[1].tolist() == batch[1].tolist()
