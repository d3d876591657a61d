"""The embedded offline world: corpus, tokenizer, nano base model and offline labels."""
import gzip
import json
import random
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from conftest import CORPUS, LABELS, NANO, ROOT

sys.path.insert(0, str(ROOT / "data"))
import build  # noqa: E402
import train_sft  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(NANO)


@pytest.fixture(scope="module")
def labels():
    return json.loads(LABELS.read_text())


def test_committed_data_is_small():
    sizes = [p.stat().st_size for p in (ROOT / "data").rglob("*") if p.is_file() and "cache" not in p.parts]
    assert sum(sizes) < 40e6


def test_corpus_has_enough_distinct_passages(tokenizer):
    with gzip.open(CORPUS, "rt") as f:
        texts = [json.loads(line)["text"] for line in f]
    assert len(texts) >= 5000
    assert len({t.lower() for t in texts}) == len(texts)
    lengths = [len(ids) for ids in tokenizer(texts[:500])["input_ids"]]
    assert 60 <= sum(lengths) / len(lengths) <= 200
    # neither all cheerful nor all grim: the labeler must have something to choose between
    vader = SentimentIntensityAnalyzer()
    compound = [vader.polarity_scores(t)["compound"] for t in texts[:500]]
    assert 0.2 < sum(c > 0.05 for c in compound) / len(compound) < 0.8


def test_tokenizer_round_trip_and_dedicated_pad(tokenizer):
    with gzip.open(CORPUS, "rt") as f:
        texts = [json.loads(next(f))["text"] for _ in range(50)]
    texts += ["Café, naïve — 'quoted' \"text\"\n\ttabs   and  spaces!", "emoji 🙂 and 中文"]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer) <= 8192
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token_id not in tokenizer.encode(" ".join(texts))


def test_nano_base_loads_offline_and_generates(tokenizer):
    model = AutoModelForCausalLM.from_pretrained(NANO)
    assert model.config.model_type == "gpt2" and model.config.vocab_size == len(tokenizer)
    ids = torch.tensor([tokenizer.encode("The old fisherman looked at the sea.")])
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=20, min_new_tokens=20,
                         pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:])
    assert len(text.split()) >= 5


def test_labels_follow_oai_schema(labels, tokenizer):
    meta = json.loads(LABELS.with_suffix(".meta.json").read_text())
    assert meta["tokenizer"] == "data/nano" and meta["vocab_size"] == len(tokenizer)
    assert len(labels) >= 6000 and meta["n_items"] == len(labels)
    for item in labels:
        assert set(item) == {"query", "sample0", "sample1", "sample2", "sample3", "best"}
        assert len(item["query"]) == meta["query_length"]
        assert item["best"] in (0, 1, 2, 3)
        for i in range(4):
            assert len(item[f"sample{i}"]) == meta["response_length"]
        assert all(0 <= t < len(tokenizer) for k in item if k != "best" for t in item[k])
    # queries are left-padded: no pad after the first real token
    for item in labels[:200]:
        q = item["query"]
        first = next(i for i, t in enumerate(q) if t != tokenizer.pad_token_id)
        assert tokenizer.pad_token_id not in q[first:]
    assert 0.5 < sum(item["best"] != 0 for item in labels) / len(labels) < 0.95


def test_best_agrees_with_vader_recomputed(labels, tokenizer):
    vader = SentimentIntensityAnalyzer()
    for item in random.Random(0).sample(labels, 300):
        scores = [vader.polarity_scores(tokenizer.decode(item[f"sample{i}"]))["compound"] for i in range(4)]
        assert scores[item["best"]] == max(scores)
        assert min(scores) < max(scores)  # all-equal queries are skipped


def test_vader_best_breaks_ties_at_random_and_skips_all_equal():
    rng = random.Random(0)
    assert build.vader_best([0.1, 0.1, 0.1, 0.1], rng) is None
    picks = {build.vader_best([0.5, -0.2, 0.5, 0.0], rng) for _ in range(50)}
    assert picks == {0, 2}


def test_query_windows_start_and_end_at_sentences(tokenizer):
    texts = ["One two three. Four five six seven. Eight nine ten eleven twelve. Thirteen."] * 3
    queries = build.query_windows(texts, tokenizer, 20, 16, seed=0)
    dot = tokenizer.convert_tokens_to_ids(".")
    for q in queries:
        assert len(q) == 16
        real = [t for t in q if t != tokenizer.pad_token_id]
        assert real[-1] == dot
        assert tokenizer.decode(real).strip()[0].isupper()


def test_clean_passage():
    assert build.clean_passage("Too short. Really.") is None
    long = ("The rain fell on the quiet town and nobody went outside that day. The baker kept his shop open anyway, "
            "hoping for a few customers. By noon he had sold two loaves and one cake to an old woman. And then the")
    out = build.clean_passage(long)
    assert out.endswith("old woman.") and "And then" not in out
    assert build.clean_passage(" ".join(["a smile that has"] * 20) + ".") is None


def test_cached_sampling_draws_what_plain_sampling_draws(tokenizer):
    """The static-KV-cache sampler (train_sft.py's copy, used by the label stage) gives the same tokens as recomputing
    the whole sequence at every step."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2,
                                       n_head=2)).eval()
    pad = tokenizer.pad_token_id
    short, long = tokenizer.encode("The rain fell all night."), tokenizer.encode(
        "She opened the door and looked outside at the garden, where the old dog was sleeping in the sun")
    queries = torch.tensor([[pad] * (12 - len(short)) + short, long[:12]])
    torch.manual_seed(1)
    with torch.no_grad():
        cached = train_sft.Sampler(model, pad, 0.7)(queries, 10)[0]
    torch.manual_seed(1)
    ids = queries
    with torch.no_grad():
        for _ in range(10):
            mask = ids != pad
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=pos).logits[:, -1]
            ids = torch.cat([ids,
                             train_sft.sample_token(torch.softmax(train_sft.sampling_logits(logits, 0.7, pad), -1))], 1)
    assert torch.equal(cached, ids[:, queries.shape[1]:])


# the summarization twin's comparisons (stage f3) -------------------------------------------------------------------


def test_twin_pairs_put_the_best_sample_against_the_worst_and_baselines_on_every_second_post():
    scores = [0.3, 0.1, 0.5, 0.2, 0.9, 0.8]  # four samples, the reference, the lead
    assert build.twin_pairs(scores, 4, 0) == [(2, 1, "twin_samples"), (3, 4, "twin_reference")]  # ranked: 1, 3, 0, 2
    assert build.twin_pairs(scores, 4, 1) == [(2, 1, "twin_samples")]
    assert build.twin_pairs(scores, 4, 2) == [(2, 1, "twin_samples"), (0, 5, "twin_lead")]


def test_twin_comparisons_follow_openai_schema_and_the_judge(tokenizer):
    records = [json.loads(line) for line in gzip.open(build.COMPARISONS, "rt", encoding="utf-8")]
    train = [r for r in records if r["split"] == "train"]
    # held-out last
    assert len(train) >= 5000 and records[len(train) :] == [r for r in records if r["split"] == "valid1"]
    batches = [r["batch"] for r in train]
    assert batches.count("twin_samples") > len(train) / 2  # most compare two samples of the SFT model
    import train_policy as tp

    # ~300 of them: the judge, recomputed, chose and its gap made the confidence
    for r in records[:: max(1, len(records) // 300)]:
        assert set(r) >= {"info", "summaries", "choice", "worker", "batch", "split",
                          "extra"} and set(r["info"]) >= {"id", "post", "title", "subreddit"}
        scores = [tp.judge_summary(r["info"]["post"], s["text"].strip())["score"] for s in r["summaries"]]
        assert scores[r["choice"]] > scores[1 - r["choice"]]
        assert r["extra"]["confidence"] == min(9, 1 + int(abs(scores[0] - scores[1]) / 0.1))
        assert [s["policy"] for s in r["summaries"]][1] in ("twin_sft_t0.7", "reference", "lead")


def test_twin_samples_resume_where_they_stopped(tmp_path, tokenizer, monkeypatch):
    """A stage stopped after its first batch of posts draws the same samples as one that ran through."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    monkeypatch.setattr(build, "TWIN_SFT_MODEL", tmp_path / "sft")
    monkeypatch.setattr(build, "TWIN_SAMPLES", tmp_path / "samples.jsonl")
    posts = [json.loads(line) for line in gzip.open(build.TLDR / "validation.jsonl.gz", "rt", encoding="utf-8")][:5]
    whole = build.twin_samples("validation", posts, 0, batch_size=2)  # 3 batches
    assert len(whole) == 5 and all(len(v) == build.TWIN_SAMPLES_PER_POST for v in whole.values())
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    (tmp_path / "samples.jsonl").write_text(lines[0] + "\n")  # stopped after the first batch
    assert build.twin_samples("validation", posts, 0, batch_size=2) == whole
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 3
