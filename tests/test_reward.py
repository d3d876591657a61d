"""train_reward.py: label formats (upstream fixtures), tokenizer conversion, losses, normalization, bad labels."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import FIXTURES, LABELS, NANO
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import train_reward as tr


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(NANO)


def args(**kw):
    return replace(tr.Args(), **kw)


# 7. k-way and pairwise losses ---------------------------------------------------------------------------------------


def test_k_way_loss_is_softmax_cross_entropy_over_the_samples_and_pairwise_is_its_n2_case():
    rewards = torch.tensor([[0.1, 2.0, -1.0, 0.3], [1.0, 0.0, 0.5, 0.2]])
    best = torch.tensor([1, 2])
    loss, acc = tr.choice_loss(rewards, best, "best_of_n")
    manual = -(torch.log_softmax(rewards, 1)[0, 1] + torch.log_softmax(rewards, 1)[1, 2]) / 2
    assert loss.item() == pytest.approx(manual.item(), abs=1e-6)
    assert acc.item() == pytest.approx(0.5)
    pair = torch.tensor([[1.2, 0.2], [-0.5, 0.5]])
    loss, acc = tr.choice_loss(pair, torch.zeros(2, dtype=torch.long), "pairwise")
    manual = -torch.nn.functional.logsigmoid(pair[:, 0] - pair[:, 1]).mean()
    assert loss.item() == pytest.approx(manual.item(), abs=1e-6) and acc.item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(tr.choice_loss(pair, torch.zeros(2, dtype=torch.long), "best_of_n")[0].item(),
                                        abs=1e-6)


# 6. normalization -----------------------------------------------------------------------------------------------------


def test_normalization_sets_gain_and_bias_to_mean_0_std_1():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    rm = tr.RewardModel(GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1,
                                                   n_head=2))).eval()
    tokens = torch.randint(2, 32, (256, 10))

    def stats():
        with torch.no_grad():
            r = rm(tokens, 1)
        return r.mean().item(), r.std(unbiased=False).item()

    with torch.no_grad():
        rm.gain.fill_(3.0)  # normalize resets gain and bias before measuring
    raw_mean, raw_std = tr.normalize(rm, stats)
    mean, std = stats()
    assert mean == pytest.approx(0.0, abs=1e-5) and std == pytest.approx(1.0, abs=1e-4)
    assert rm.gain.item() == pytest.approx(1 / raw_std,
                                           rel=1e-5) and rm.bias.item() == pytest.approx(-raw_mean / raw_std, rel=1e-4)


# label formats
# ----------------------------------------------------------------------------------------------------------


def test_embedded_labels_load_with_their_own_tokenizer(tokenizer):
    train, test, kind, _ = tr.load_labels(args(num_train=64, num_test=32), tokenizer)
    assert kind == ("best_of_n", 4)
    q, s, b = train
    assert q.shape == (64, 32) and s.shape == (64, 4, 24) and b.shape == (64,)
    items = json.loads(LABELS.read_text())
    assert q[0].tolist() == items[0]["query"] and s[0, 2].tolist() == items[0]["sample2"]
    assert test[0][-1].tolist() == items[-1]["query"]  # held-out labels come from the end of the file


def test_oai_upstream_label_format_right_padded_with_pad_50259(tokenizer):
    """OAI's offline_5k.json: a list; queries of 64 ids right-padded with 50259; samples of 24 (pads after the '.')."""
    path = str(FIXTURES / "oai_offline_labels.json")
    a = args(label_dataset=path, label_pad_token_id=50259, num_train=4, num_test=2, query_length=64, batch_size=2)
    (q, s, b), (tq, ts, tb), kind, _ = tr.load_labels(a, tokenizer)
    items = json.loads(open(path).read())
    real = [t for t in items[0]["query"] if t != 50259]
    pad = tokenizer.pad_token_id
    assert q[0].tolist() == [pad] * (64 - len(real)) + real  # re-padded on the left
    sample = [t for t in items[0]["sample1"] if t != 50259]
    assert s[0, 1].tolist() == sample + [pad] * (24 - len(sample))
    assert b.tolist() == [it["best"] for it in items[:4]] and tb.tolist() == [it["best"] for it in items[-2:]]


def make_other_tokenizer(tmp_path, texts):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<pad>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(tmp_path / "other_tok")
    return fast


def test_labels_of_another_tokenizer_are_decoded_and_re_encoded(tmp_path, tokenizer):
    texts = ["The dog ran home.", " She was happy.", " It rained all day.", " They cheered.", " He wept."]
    other = make_other_tokenizer(tmp_path, texts)
    items = [{"query": other.encode(texts[0]), "sample0": other.encode(texts[1]), "sample1": other.encode(texts[2]),
              "sample2": other.encode(texts[3]), "sample3": other.encode(texts[4]), "best": 1}] * 4
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(items))
    a = args(label_dataset=str(path), label_tokenizer=str(tmp_path / "other_tok"), num_train=2, num_test=2,
             batch_size=2)
    (q, s, b), _, _, _ = tr.load_labels(a, tokenizer)
    pad = tokenizer.pad_token_id
    assert q[0][q[0] != pad].tolist() == tokenizer.encode(texts[0])
    for j in range(4):
        assert s[0, j][s[0, j] != pad].tolist() == tokenizer.encode(texts[j + 1])
    assert other.encode(texts[1]) != tokenizer.encode(texts[1])  # the two tokenizers really differ


def test_pairwise_text_labels(tokenizer):
    path = str(FIXTURES / "pairwise_labels.jsonl")
    (q, s, b), (tq, ts, tb), kind, _ = tr.load_labels(args(label_dataset=path, num_train=4, num_test=2, batch_size=2),
                                                      tokenizer)
    assert kind == ("pairwise", 2) and s.shape == (4, 2, 24) and (b == 0).all()
    row = json.loads(open(path).readline())
    assert s[0, 0][s[0, 0] != tokenizer.pad_token_id].tolist() == tokenizer.encode(row["chosen"])

# preference formats read from text (tests/fixtures in each upstream layout) ------------------------------------------


def read_rows(path):
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()]


def write_rows(path, rows):
    path.write_text(json.dumps(rows) if path.suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows))


def right_padded(tokens, length, pad):
    return tokens[:length] + [pad] * (length - len(tokens[:length]))


def real(tokenizer, row):
    """The text of a tensor row without its pads."""
    return tokenizer.decode(row[row != tokenizer.pad_token_id].tolist())


def test_openai_comparisons_give_the_tldr_query_and_the_chosen_summary_first_with_eos(tokenizer):
    path = FIXTURES / "oai_comparisons.jsonl"
    a = args(label_dataset=str(path), num_train=2, num_test=4, query_length=96, response_length=24)
    (q, s, b), (tq, ts, tb), kind, meta = tr.load_labels(a, tokenizer)
    rows = read_rows(path)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert kind == ("pairwise", 2) and q.shape == (2, 96) and ts.shape == (4, 2,
                                                                           24) and (b == 0).all() and (tb == 0).all()
    for query, pair, row in zip(torch.cat([q, tq]), torch.cat([s, ts]), rows):
        assert query.tolist() == tr.format_tldr_query(row["info"], tokenizer, 96)
        chosen, rejected = row["summaries"][row["choice"]]["text"], row["summaries"][1 - row["choice"]]["text"]
        assert pair[0].tolist() == right_padded(tokenizer.encode(chosen) + [eos], 24, pad)
        assert pair[1].tolist() == right_padded(tokenizer.encode(rejected) + [eos], 24, pad)
    # choice 1: summaries[1] lands in column 0; summaries keep their leading space and end with EOS
    assert real(tokenizer, ts[2, 0]) == rows[4]["summaries"][1]["text"] + "<|endoftext|>"
    # a post too long loses its last line (SFD: cut at its last "\n"); a summary too long loses its EOS
    info = rows[0]["info"]
    assert real(tokenizer, q[0]) == (f"SUBREDDIT: r/{info['subreddit']}\n\nTITLE: {info['title']}\n\nPOST: "
                                     f"{info['post'].rsplit(chr(10), 1)[0]}\n\nTL;DR:")
    assert s[0, 0].tolist() == tokenizer.encode(rows[0]["summaries"][0]["text"])[:24] and eos not in s[0, 0].tolist()
    # held-out labels keep split, batch and confidence (an empty "extra" has none)
    assert meta == [{"split": "train", "batch": "batch5"}, {"split": "valid1", "batch": "batch9", "confidence": 8},
                    {"split": "valid2", "batch": "batch9", "confidence": 3},
                    {"split": "valid1", "batch": "batch10", "confidence": 8}]


def test_carperai_prompt_chosen_rejected_end_the_query_with_tldr_and_keep_one_leading_space(tokenizer):
    """CarperAI/openai_summarize_comparisons: prompts "SUBREDDIT: r/..\\nTITLE: ..\\nPOST: .." without "TL;DR:",
    summaries "TL;DR: " + OAI's text (which starts with a space)."""
    path = FIXTURES / "carperai_comparisons.jsonl"
    (q, s, b), (tq, ts,
                _), kind, meta = tr.load_labels(args(label_dataset=str(path), num_train=2, num_test=2,
                                                     query_length=64), tokenizer)
    rows = read_rows(path)
    assert kind == ("pairwise", 2) and (b == 0).all() and meta == [{}, {}]
    for query, pair, row in zip(torch.cat([q, tq]), torch.cat([s, ts]), rows):
        assert query.tolist() == tr.cut_prompt(row["prompt"] + "\nTL;DR:", tokenizer, 64)
        assert real(tokenizer, query).endswith("\nTL;DR:")
        assert real(tokenizer, pair[0]) == " " + row["chosen"].removeprefix("TL;DR:  ") + "<|endoftext|>"
        assert real(tokenizer, pair[1]) == " " + row["rejected"].removeprefix("TL;DR:  ") + "<|endoftext|>"
    # too long by less than its first line: that line loses tokens, the end stays
    assert len(tokenizer.encode(rows[1]["prompt"] + "\nTL;DR:")) > 64 and (q[1] != tokenizer.pad_token_id).all()


def test_explicit_prompt_pairs_are_tokenized_as_is(tmp_path, tokenizer):
    """TRL's explicit-prompt preference data: prompt, chosen and rejected texts, the responses with their own
    spacing."""
    rows = [{"prompt": f"Question {i}: name a colour.\nAnswer:", "chosen": " Blue.",
             "rejected": " Seven."} for i in range(4)]
    path = tmp_path / "prefs.jsonl"
    write_rows(path, rows)
    (q, s, _), _, _, _ = tr.load_labels(args(label_dataset=str(path), num_train=2, num_test=2), tokenizer)
    assert real(tokenizer, q[1]) == rows[1]["prompt"] and q[1, -1].item() != tokenizer.pad_token_id
    assert s[1, 0].tolist() == right_padded(tokenizer.encode(" Blue.") + [tokenizer.eos_token_id], 24,
                                            tokenizer.pad_token_id)


def test_hh_conversations_split_after_the_last_shared_assistant_turn(tokenizer):
    path = FIXTURES / "hh_rlhf.jsonl"
    (q, s, _), (tq, ts,
                _), kind, _ = tr.load_labels(args(label_dataset=str(path), num_train=2, num_test=2, query_length=48),
                                             tokenizer)
    rows = read_rows(path)
    assert kind == ("pairwise", 2)
    # a multi-turn conversation: the prompt holds the earlier turns and ends with the last "\n\nAssistant:"
    prompt = ("\n\nHuman: What is a good first book on astronomy?\n\nAssistant: Do you want something with pictures or "
              "more text?\n\nHuman: More text.\n\nAssistant:")
    assert rows[1]["chosen"].startswith(prompt) and len(tokenizer.encode(prompt)) > 48
    assert q[1].tolist() == tr.cut_prompt(prompt, tokenizer, 48) and real(tokenizer,
                                                                          q[1]).endswith("More text.\n\nAssistant:")
    assert real(tokenizer, s[1, 0]) == " Try a short history of the night sky written for beginners.<|endoftext|>"
    assert real(tokenizer, s[1, 1]) == " I do not know.<|endoftext|>"
    # responses that begin alike still split at "\n\nAssistant:"
    assert real(tokenizer, tq[1]) == "\n\nHuman: Why is the sky blue?\n\nAssistant:"
    assert real(tokenizer, ts[1, 1]).startswith(" Air scatters red")


def test_prompt_answer1_answer2_list_prefers_answer1(tokenizer):
    path = FIXTURES / "answer_pairs.json"
    (q, s, b), _, kind, _ = tr.load_labels(args(label_dataset=str(path), num_train=2, num_test=2), tokenizer)
    rows = read_rows(path)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert kind == ("pairwise", 2) and (b == 0).all()
    for i in range(2):
        assert q[i].tolist() == tr.cut_prompt(rows[i]["prompt"], tokenizer, 32) and real(tokenizer,
                                                                                         q[i]) == rows[i]["prompt"]
        assert s[i, 0].tolist() == right_padded(tokenizer.encode(rows[i]["answer1"]) + [eos], 24, pad)
        assert s[i, 1].tolist() == right_padded(tokenizer.encode(rows[i]["answer2"]) + [eos], 24, pad)


def test_long_prompts_lose_whole_leading_lines_then_tokens_and_keep_their_end(tokenizer):
    prompt = "line one is here\nline two is here\nTL;DR:"
    full, last_two = tokenizer.encode(prompt), tokenizer.encode("line two is here\nTL;DR:")
    pad = tokenizer.pad_token_id
    assert tr.cut_prompt(prompt, tokenizer, len(full) + 3) == [pad] * 3 + full  # fits: left-padded
    # the first line lies wholly in the part that goes
    assert tr.cut_prompt(prompt, tokenizer, len(last_two)) == last_two
    # a line that must partly stay: tokens go
    assert tr.cut_prompt(prompt, tokenizer, len(last_two) - 2) == last_two[2:]
    assert tokenizer.decode(tr.cut_prompt(prompt, tokenizer, 3)).endswith("DR:")


def test_accuracy_breakdown_by_split_batch_and_confidence():
    meta = [{"split": "valid1", "batch": "batch9", "confidence": 8},
            {"split": "valid1", "batch": "batch10", "confidence": 8}, {"split": "valid2", "batch": "batch9"}, {}]
    assert tr.accuracy_breakdown([True, False, True, True], meta) == {
        "test/accuracy/batch/batch10": 0.0, "test/accuracy/batch/batch9": 1.0, "test/accuracy/confidence/8": 0.5,
        "test/accuracy/split/valid1": 0.5, "test/accuracy/split/valid2": 1.0}
    assert tr.accuracy_breakdown([True], [{}]) == {}


def set_summary_text(rows, i, j, text):
    rows[i]["summaries"][j]["text"] = text


# fixture, change to its records, the message (after "item <i>" of the file)
BAD_RECORDS = {
    "choice_2": ("oai_comparisons.jsonl", lambda r: r[1].update(choice=2), "item 1 has choice = 2, not 0 or 1"),
    "three_summaries": ("oai_comparisons.jsonl", lambda r: r[0]["summaries"].append(r[0]["summaries"][0]),
                        "item 0 summaries is not a list of two"),
    "empty_summary": ("oai_comparisons.jsonl", lambda r: set_summary_text(r, 1, 1, "  "),
                      "item 1 summaries[1].text is an empty text"),
    "no_post_held_out": ("oai_comparisons.jsonl", lambda r: r[5]["info"].pop("post"), "item 5 info.post is not a text"),
    "cnndm": ("oai_comparisons.jsonl",
              lambda r: r[0].update(info={"id": "c0ffee", "site": "dailymail", "title": "A title",
                                          "article": "News."}), "item 0 is a CNN/DM comparison"),
    "missing_choice": ("oai_comparisons.jsonl", lambda r: r[4].pop("choice"), "item 4 lacks the key(s) choice"),
    "chosen_null": ("carperai_comparisons.jsonl", lambda r: r[0].update(chosen=None), "item 0 chosen is not a text"),
    "no_shared_prompt": ("hh_rlhf.jsonl", lambda r: r[1].update(rejected="\n\nHuman: Something else."),
                         "item 1 chosen and rejected share no prompt"),
    "empty_response": ("hh_rlhf.jsonl",
                       lambda r: r[0].update(chosen="\n\nHuman: How do I keep basil alive indoors?\n\nAssistant:"),
                       "item 0 has an empty chosen response"),
    "answer_not_text": ("answer_pairs.json", lambda r: r[1].update(answer2=7), "item 1 answer2 is not a text"),
    "unknown_format": ("answer_pairs.json", lambda r: r.insert(0, {"text": "hello"}),
                       "item 0 is in no known label format"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_records_end_with_one_line_naming_file_and_record_and_exit_2(tmp_path, capsys, tokenizer, case):
    fixture, change, message = BAD_RECORDS[case]
    rows = read_rows(FIXTURES / fixture)
    change(rows)
    path = tmp_path / fixture
    write_rows(path, rows)
    with pytest.raises(SystemExit) as stop:
        tr.load_labels(args(label_dataset=str(path), num_train=2, num_test=2, query_length=128), tokenizer)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --label_dataset {path}: ") and message in err[0], err


def test_hub_dataset_rows_read_as_the_file_would(monkeypatch, tokenizer):
    """A hub dataset id goes to datasets.load_dataset(id, config, split=...); as the hub's
    openai/summarize_from_feedback, its info has every field (None where absent) and extra.confidence may be None; other
    columns are dropped."""
    import datasets

    rows = read_rows(FIXTURES / "oai_comparisons.jsonl")
    hub_rows = [{**r, "info": {**r["info"], "article": None, "site": None},
                 "extra": {"confidence": r["extra"].get("confidence")}, "query_token": [7] * 8} for r in rows]
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a,
                        **kw: calls.append((a, kw)) or datasets.Dataset.from_list(hub_rows))
    a = args(label_dataset="openai/summarize_from_feedback", label_config="comparisons", label_split="validation",
             num_train=2, num_test=4, query_length=96)
    (q, s, _), (_, ts, _), _, meta = tr.load_labels(a, tokenizer)
    assert calls == [(("openai/summarize_from_feedback", "comparisons"), {"split": "validation"})]
    expected = tr.load_labels(replace(a, label_dataset=str(FIXTURES / "oai_comparisons.jsonl")), tokenizer)
    assert torch.equal(q, expected[0][0]) and torch.equal(ts, expected[1][1]) and meta == expected[3]


def test_hub_dataset_id_offline_fails_with_one_line(capsys):
    name = "vwxyzjn/summarize_from_feedback_oai_preprocessing_1706381144"
    with pytest.raises(SystemExit) as stop:
        tr.load_labels(args(label_dataset=name, label_split="validation"), None)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err[-1].startswith(f"error: --label_dataset {name}: cannot be loaded"), err


# bad labels: one line, exit 2, nothing written ------------------------------------------------------------------------


def oai_items():
    return json.loads((FIXTURES / "oai_offline_labels.json").read_text())


BAD = {
    "malformed": ("labels.json", lambda: '[{"query": [1, 2], "sample0": [3]', "not valid JSON"),
    "missing_key": ("labels.json",
                    lambda: json.dumps([{k: v for k, v in it.items() if k != "sample2"} for it in oai_items()]),
                    "lacks the key(s) sample2"),
    "best_out_of_range": ("labels.json", lambda: json.dumps([{**it, "best": 4} for it in oai_items()]),
                          "best = 4, not an integer in 0..3"),
    "id_outside_vocab": ("labels.json", lambda: json.dumps([{**it, "sample0": [5000, 7]} for it in oai_items()]),
                         "token id 5000 outside"),
    "comparison_choice": ("labels.jsonl",
                          lambda: "".join(json.dumps({**json.loads(line), "choice": 2}) + "\n" for line in
                                                        (FIXTURES / "oai_comparisons.jsonl").read_text().splitlines()),
                                                        "item 0 has choice = 2"),
    "empty": ("labels.json", lambda: "", "is empty"),
    "empty_list": ("labels.json", lambda: "[]", "no labels"),
    "missing_file": (None, None, "file not found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_labels_end_with_one_line_and_exit_2_and_write_nothing(tmp_path, case, main):
    name, make, message = BAD[case]
    path = tmp_path / (name or "nothing_here.json")
    if make is not None:
        path.write_text(make())
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "keep.txt").write_text("an earlier run")
    r = main(tr, "--label_dataset", path, "--label_pad_token_id", "50259", "--num_train", "4", "--num_test", "2",
             "--batch_size", "2", "--local_micro_batch_size", "1", "--run_root", runs)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert lines[-1].startswith("error: ") and str(path) in lines[-1] and message in lines[-1], r.stderr[-2000:]
    assert sorted(p.name for p in runs.iterdir()) == ["keep.txt"]


def test_hub_labels_offline_fail_cleanly(tmp_path, main):
    r = main(tr, "--label_dataset", "vwxyzjn/lm-human-preferences/sentiment/offline_5k.json", "--run_root", tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: --label_dataset "
                                                        "vwxyzjn/lm-human-preferences/sentiment/offline_5k.json")


def test_reference_bias_makes_reference_summaries_score_zero_on_average(tokenizer):
    """SFD's bias: after training, the reward model's bias moves so that reference summaries of TL;DR posts score 0."""
    from types import SimpleNamespace

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    lm, tok = tr.prepare_lm(GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=16,
                                                       n_layer=1, n_head=2)), tokenizer)
    rm = tr.RewardModel(lm).eval()
    rows = tr.load_texts(str(FIXTURES / "tldr_train.jsonl"), "train")
    a = args(normalize_samples=16, rollout_batch_size=8, query_length=160, response_length=24)
    one_process = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"), reduce=lambda t,
                                  reduction: t)
    mean = tr.reference_reward_mean(rm, tr.query_batches(rows, tok, 160, 24, 8, seed=0), a, one_process,
                                    tok.pad_token_id)
    # the 8 posts, the same as the 16 samples
    queries, references = next(tr.query_batches(rows, tok, 160, 24, 8, seed=0))
    with torch.no_grad():
        direct = rm(torch.cat([queries, references], 1), tok.pad_token_id).mean().item()
        assert mean == pytest.approx(direct, abs=1e-5)
        rm.bias -= mean
        assert rm(torch.cat([queries, references], 1), tok.pad_token_id).mean().item() == pytest.approx(0.0, abs=1e-5)
