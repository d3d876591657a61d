"""train_reward.py: label formats (upstream fixtures), tokenizer conversion, losses, normalization, bad labels."""

import json
import sys
from dataclasses import replace

import pytest
import torch
from conftest import FIXTURES, LABELS, NANO, run_script
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
    assert loss.item() == pytest.approx(tr.choice_loss(pair, torch.zeros(2, dtype=torch.long), "best_of_n")[0].item(), abs=1e-6)


# 6. normalization -----------------------------------------------------------------------------------------------------


def test_normalization_sets_gain_and_bias_to_mean_0_std_1():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    rm = tr.RewardModel(GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2))).eval()
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
    assert rm.gain.item() == pytest.approx(1 / raw_std, rel=1e-5) and rm.bias.item() == pytest.approx(-raw_mean / raw_std, rel=1e-4)


# label formats ----------------------------------------------------------------------------------------------------------


def test_embedded_labels_load_with_their_own_tokenizer(tokenizer):
    train, test, kind = tr.load_labels(args(num_train=64, num_test=32), tokenizer)
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
    (q, s, b), (tq, ts, tb), kind = tr.load_labels(a, tokenizer)
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
    a = args(label_dataset=str(path), label_tokenizer=str(tmp_path / "other_tok"), num_train=2, num_test=2, batch_size=2)
    (q, s, b), _, _ = tr.load_labels(a, tokenizer)
    pad = tokenizer.pad_token_id
    assert q[0][q[0] != pad].tolist() == tokenizer.encode(texts[0])
    for j in range(4):
        assert s[0, j][s[0, j] != pad].tolist() == tokenizer.encode(texts[j + 1])
    assert other.encode(texts[1]) != tokenizer.encode(texts[1])  # the two tokenizers really differ


def test_pairwise_text_labels(tokenizer):
    path = str(FIXTURES / "pairwise_labels.jsonl")
    (q, s, b), (tq, ts, tb), kind = tr.load_labels(args(label_dataset=path, num_train=4, num_test=2, batch_size=2), tokenizer)
    assert kind == ("pairwise", 2) and s.shape == (4, 2, 24) and (b == 0).all()
    row = json.loads(open(path).readline())
    assert s[0, 0][s[0, 0] != tokenizer.pad_token_id].tolist() == tokenizer.encode(row["chosen"])


# bad labels: one line, exit 2, nothing written ------------------------------------------------------------------------


def oai_items():
    return json.loads((FIXTURES / "oai_offline_labels.json").read_text())


BAD = {
    "malformed": ("labels.json", lambda: '[{"query": [1, 2], "sample0": [3]', "not valid JSON"),
    "missing_key": ("labels.json", lambda: json.dumps([{k: v for k, v in it.items() if k != "sample2"} for it in oai_items()]), "lacks the key(s) sample2"),
    "best_out_of_range": ("labels.json", lambda: json.dumps([{**it, "best": 4} for it in oai_items()]), "best = 4, outside 0..3"),
    "id_outside_vocab": ("labels.json", lambda: json.dumps([{**it, "sample0": [5000, 7]} for it in oai_items()]), "token id 5000 outside"),
    "empty": ("labels.json", lambda: "", "is empty"),
    "empty_list": ("labels.json", lambda: "[]", "no labels"),
    "missing_file": (None, None, "file not found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_labels_end_with_one_line_and_exit_2_and_write_nothing(tmp_path, case):
    name, make, message = BAD[case]
    path = tmp_path / (name or "nothing_here.json")
    if make is not None:
        path.write_text(make())
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "keep.txt").write_text("an earlier run")
    r = run_script([sys.executable, "train_reward.py", "--label_dataset", str(path), "--label_pad_token_id", "50259",
                    "--num_train", "4", "--num_test", "2", "--batch_size", "2", "--local_micro_batch_size", "1", "--run_root", str(runs)])
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert lines[-1].startswith("error: ") and str(path) in lines[-1] and message in lines[-1], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in runs.iterdir()) == ["keep.txt"]


def test_hub_labels_offline_fail_cleanly(tmp_path):
    r = run_script([sys.executable, "train_reward.py", "--label_dataset", "vwxyzjn/lm-human-preferences/sentiment/offline_5k.json",
                    "--run_root", str(tmp_path)])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --label_dataset vwxyzjn/lm-human-preferences/sentiment/offline_5k.json")
