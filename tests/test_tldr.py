"""Summarization (TL;DR) in train_policy.py, detail by detail against SFD (docs/summarization.md): query data with
reference summaries, the EOS trick and SFD's masks, the critic initialised from the reward model, trlX's reference
baseline, ROUGE, the twin's judge and the evaluation, and a whole PPO run on tiny settings."""

import json
import sys
from types import SimpleNamespace

import pytest
import torch
import tyro
from conftest import FIXTURES, NANO, ROOT
from transformers import AutoTokenizer

import train_policy as tp

sys.path.insert(0, str(ROOT / "benchmark"))
import best_of_n  # noqa: E402

TLDR = FIXTURES / "tldr_train.jsonl"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(NANO)


@pytest.fixture(scope="module")
def tiny(tiny_models):
    """The session's 1-layer GPT-2 of 256 positions on the nano tokenizer (a base model folder and a reward model made
    from it), and the model loaded."""
    return tiny_models, tp.prepare_lm(*tp.load_base_model(str(tiny_models / "base")))[0].eval()


def test_tldr_rows_give_sfd_queries_with_reference_responses(tok):
    rows = tp.load_texts(str(TLDR), "train")
    assert isinstance(rows[0], dict) and set(tp.TLDR_KEYS) <= set(rows[0])
    queries, references = next(tp.query_batches(rows, tok, 160, 24, 8, seed=1))
    assert queries.shape == (8, 160) and references.shape == (8, 24)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(1)).tolist()
    first = rows[order[0]]
    assert queries[0].tolist() == tp.format_tldr_query(first, tok, 160)
    # ' {summary}<|endoftext|>', cut so that the EOS stays, right-padded
    ids = tok.encode(" " + first["summary"])
    want = (ids[:23] + [tok.eos_token_id] + [tok.pad_token_id] * 24)[:24]
    assert references[0].tolist() == want and tok.eos_token_id in references[0].tolist()
    short = tp.format_tldr_response("Short one.", tok, 24)
    assert short[: len(tok.encode(" Short one.")) + 1] == tok.encode(" Short one.") + [tok.eos_token_id]
    assert short[-1] == tok.pad_token_id


def test_eos_trick_truncates_after_the_first_eos_and_penalizes_responses_without_one(tok):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert tp.truncate_token_id("eos", tok) == eos and tp.truncate_token_id(None, tok) is None
    r = torch.tensor([[5, 6, eos, 7, eos], [5, 6, 7, 8, 9], [eos, 5, 6, 7, 8]])
    scored = tp.truncate_responses(r, eos, 0, pad)
    assert scored.tolist() == [[5, 6, eos, pad, pad], [5, 6, 7, 8, 9], [eos, pad, pad, pad, pad]]
    scores = tp.penalize(torch.tensor([0.5, 0.7, 0.9]), scored, eos, 0, -1.0)
    assert scores.tolist() == pytest.approx([0.5, -1.0, 0.9])


def test_sfd_masks_end_log_probs_at_the_eos_values_one_later_and_put_the_score_after_it(tok):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    scored = torch.tensor([[5, eos, pad, pad, pad], [5, 6, 7, 8, 9], [5, 6, 7, eos, pad]])
    valid, value_valid, at = tp.response_masks(scored, pad, mask_after_truncate=True)
    assert valid.int().tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert value_valid.int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert at.tolist() == [2, 4, 4]  # one after the EOS, or the last token ({SFD}/ppo.py#L683-L685)
    valid, value_valid, at = tp.response_masks(scored, pad, mask_after_truncate=False)  # OAI: whole responses
    assert valid.all() and value_valid.all() and at.tolist() == [4, 4, 4]
    # masked log-probs are one constant in policy and reference: no KL there; the score lands at its index
    logp, ref = torch.full((1, 5), -2.0), torch.full((1, 5), -1.0)
    valid, _, at = tp.response_masks(scored[:1], pad, True)
    logp, ref = logp.masked_fill(~valid, tp.INVALID_LOGPROB), ref.masked_fill(~valid, tp.INVALID_LOGPROB)
    rewards, non_score = tp.compute_rewards(torch.tensor([3.0]), tp.kl_estimate(logp, ref, "k1"), 0.1, at)
    torch.testing.assert_close(rewards, torch.tensor([[0.1, 0.1, 3.0, 0.0, 0.0]]))  # -0.1 * (-2 - -1) per valid token


def test_masked_whitening_and_losses_see_only_the_valid_tokens():
    torch.manual_seed(0)
    x, valid = torch.randn(3, 6), torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]],
                                               dtype=torch.bool)
    w = tp.whiten(x, valid=valid)
    kept = x[valid]
    torch.testing.assert_close(w[valid], (kept - kept.mean()) / torch.sqrt(kept.var(unbiased=False) + 1e-8))
    clips = dict(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    logp, old, v, old_v, adv, ret = (torch.randn(3, 6) for _ in range(6))
    loss, stats = tp.ppo_loss(logp, v, old, old_v, adv, ret, valid, valid, valid.sum(), valid.sum(), **clips)
    sub = [t[valid][None] for t in (logp, v, old, old_v, adv, ret)]
    every = torch.ones_like(sub[0], dtype=torch.bool)
    want, want_stats = tp.ppo_loss(*sub, every, every, every.sum(), every.sum(), **clips)
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    assert stats["ppo/policy/clipfrac"].item() == pytest.approx(want_stats["ppo/policy/clipfrac"].item(), abs=1e-6)


def test_critic_is_initialised_from_the_reward_model_and_trains_apart_from_the_policy(tiny, tok):
    _, lm = tiny
    pad = tok.pad_token_id
    reward_model = tp.RewardModel(lm).eval()
    with torch.no_grad():
        reward_model.gain.fill_(1.5)
        reward_model.bias.fill_(0.2)
    policy = tp.PolicyAndValue(lm, critic=tp.copy.deepcopy(reward_model)).eval()
    assert not hasattr(policy, "value_head")
    tokens = torch.randint(2, len(tok), (2, 12))
    with torch.no_grad():
        _, values = policy(tokens, pad, 5)
        scores = reward_model.scores(tokens, pad)
        # the critic's value of each state is the reward model's head read there (gain and bias included)
        torch.testing.assert_close(values, scores[:, -6:-1])
        torch.testing.assert_close(reward_model(tokens, pad), scores[:, -1])
    assert policy.critic.lm is not policy.lm and policy.critic.lm is not reward_model.lm  # its own transformer


def test_base_critic_starts_as_the_base_model_and_trains_apart_from_the_policy(tiny, tmp_path, main):
    # --value_model base: TRL PPOTrainer's value model, a second copy of the base model with a fresh head
    folder, _ = tiny
    r = main(tp, "--base_model", folder / "base", "--reward_model", folder / "reward_model", "--query_dataset", TLDR,
             "--query_length", "160", "--response_length", "8", "--value_model", "base", "--gold_labeler", "none",
             "--total_episodes", "16", "--batch_size", "8", "--nminibatches", "1", "--local_micro_batch_size", "4",
             "--noptepochs", "1", "--run_root", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    critic = tp.load_reward_model(str(run_dir / "critic"))[0]
    base, policy, reward_model = (tp.AutoModelForCausalLM.from_pretrained(folder / "base"),
                                  tp.AutoModelForCausalLM.from_pretrained(run_dir / "policy"),
                                  tp.load_reward_model(str(folder / "reward_model"))[0])
    weights = lambda m: torch.cat([p.detach().flatten() for p in m.base_model.parameters()])
    # trained from the base's weights (close to them after two small steps), apart from the policy's, with its own head
    # (not the reward model's: the tiny reward model shares the base's transformer, so only the heads tell the two
    # apart)
    assert 0 < (weights(critic.lm) - weights(base)).abs().max() < 0.01
    assert (critic.head.weight - reward_model.head.weight).abs().max() > 0.05
    assert (weights(critic.lm) - weights(policy)).abs().max() > 0
    assert not (run_dir / "policy" / "value_head.safetensors").exists()


def test_rouge_on_hand_examples():
    r = tp.rouge(["the cat sat on the mat", "a dog ran"], ["the cat sat on the mat", "the cat sat"])
    assert r[0] == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}) and r[1]["rouge1"] == 0.0
    partial = tp.rouge(["the cat ran away"], ["the cat sat down"])[0]
    assert partial["rouge1"] == pytest.approx(0.5) and partial["rouge2"] == pytest.approx(1 / 3)


POST = ("Mia found a stray kitten in the rain. She carried the kitten home out of the rain, dried the kitten and named "
        "it Pebble. "
        "Pebble slept by the fire.")
TITLE = "A kitten in the storm"


def test_content_words_drop_stop_words_and_short_words_and_stem():
    assert tp.content_words("She carried the kittens home; it was raining.") == ["carri", "kitten", "home", "rain"]
    assert tp.content_words("twinkle twinkled twinkling Sarah's") == ["twinkl"] * 3 + ["sarah"]


def test_the_twin_judge_on_hand_examples():
    # the post's key words: content words used at least twice, most frequent first: kitten (3), rain (2), pebbl (2)
    j = tp.judge_summary(POST, "Mia found a kitten in the rain and named it Pebble.")
    # content words mia, found, kitten, rain, name, pebbl: all in the post; all three key words covered
    assert j == pytest.approx(dict(score=1.0, faithful=1.0, coverage=1.0, repeated=0.0, words=11))
    j = tp.judge_summary(POST, "A kitten danced on the moon.")
    # kitten is in the post, danc and moon are not: faithful 1/3; coverage: kitten only, 1/3
    assert j["faithful"] == pytest.approx(1 / 3)
    assert j["coverage"] == pytest.approx(1 / 3) and j["score"] == pytest.approx(1 / 3)
    # the title is no source: "storm" is only in it
    assert tp.judge_summary(POST, "stray storm")["faithful"] == 0.5
    # repetition: 9 bigrams of which 4 repeat an earlier one; the key words covered: kitten and rain of 3
    j = tp.judge_summary(POST, "the kitten in the rain the kitten in the rain")
    assert j["repeated"] == pytest.approx(4 / 9) and j["score"] == pytest.approx((1 + 2 / 3) / 2 - 4 / 9)
    # concision: 0.02 off per word past 30
    # xa .. xy
    long = "Mia found a kitten in the rain and named it Pebble " + " ".join("x" + chr(97 + i) for i in range(25))
    j = tp.judge_summary(POST, long)
    assert j["words"] == 36 and j["score"] == pytest.approx(1.0 - 0.02 * 6)
    assert tp.judge_summary(POST, "")["score"] == 0.0  # nothing said, nothing right
    # a post without a word used twice: coverage is the faithfulness
    assert tp.judge_summary("One cat sat.", "cat")["coverage"] == 1.0


def test_tldr_judge_reads_the_post_from_the_query_and_needs_no_reference(tok):
    query = tok.decode(tp.format_tldr_query({"subreddit": "pets", "title": TITLE, "post": POST}, tok, 160),
                       skip_special_tokens=True)
    assert tp.query_post(query) == POST
    summary = "Mia named the kitten Pebble."
    assert tp.tldr_judge([summary], [query]) == [tp.judge_summary(POST, summary)["score"]]
    with pytest.raises(ValueError, match="not a TL;DR query"):
        tp.tldr_judge([summary], ["Once upon a time"])
    assert tp.gold_scorer("tldr_judge") is tp.tldr_judge and tp.gold_scorer("none") is None


def test_evaluate_reports_rouge_win_rate_and_gold_on_held_out_posts(tiny, tok):
    _, lm = tiny
    rows = tp.load_texts(str(TLDR), "train")
    queries, references = next(tp.query_batches(rows, tok, 160, 24, 8, seed=0))
    reward_model = tp.RewardModel(lm).eval()
    args = tp.Args(truncate_token="eos", truncate_after=0, num_print_samples=2)
    state = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"), reduce=lambda t, reduction: t)
    torch.manual_seed(0)
    metrics, texts = tp.evaluate(tp.Sampler(lm, tok.pad_token_id, 0.01), reward_model, queries, references, tok, args,
                                 tp.tldr_judge, state, chunk=3)
    assert len(texts) == 8 and set(metrics) >= {"eval/rouge1", "eval/rouge2", "eval/rougeL", "eval/win_rate",
                                                "eval/gold_score"}
    ref_texts = tok.batch_decode([r[r != tok.pad_token_id] for r in references], skip_special_tokens=True)
    assert metrics["eval/rougeL"] == pytest.approx(sum(r["rougeL"] for r in tp.rouge(texts, ref_texts)) / 8)
    query_texts = tok.batch_decode([q[q != tok.pad_token_id] for q in queries])
    assert metrics["eval/gold_score"] == pytest.approx(sum(tp.tldr_judge(texts, query_texts)) / 8)
    assert 0.0 <= metrics["eval/win_rate"] <= 1.0


def test_ppo_on_tldr_posts_with_sfd_details_runs_end_to_end(tiny, tmp_path, main):
    folder, _ = tiny
    r = main(tp, "--base_model", folder / "base", "--reward_model", folder / "reward_model", "--query_dataset", TLDR,
             "--eval_dataset", TLDR, "--num_eval", "4", "--eval_every", "1", "--query_length", "160",
             "--response_length", "16", "--truncate_token", "eos", "--truncate_after", "0", "--mask_after_truncate",
             "--value_model", "reward", "--reference_baseline", "--no_whiten_rewards", "--no_adaptive_kl", "--kl_coef",
             "0.05", "--optimizer", "adamw", "--gold_labeler", "tldr_judge", "--total_episodes", "16", "--batch_size",
             "8", "--nminibatches", "1", "--local_micro_batch_size", "4", "--noptepochs", "1", "--print_sample_every",
             "1", "--run_root", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    start, *metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    # the evaluation of the initial policy comes first (update 0), then one record per update
    assert start["update"] == 0 and "episode" not in start and {"eval/rougeL", "eval/win_rate",
                                                                "eval/gold_score"} <= set(start)
    assert [m["update"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {"eval/rougeL", "eval/win_rate", "eval/gold_score", "objective/gold_score",
                "objective/truncated_fraction"} <= set(m)
    assert metrics[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert (run_dir / "critic" / "reward_head.safetensors").is_file()
    assert not (run_dir / "policy" / "value_head.safetensors").exists()
    r = main(tp, "--reward_model", folder / "reward_model", "--reference_baseline", "--run_root", tmp_path / "no")
    assert r.returncode == 2 and "--reference_baseline needs TL;DR queries" in r.stderr


def test_best_of_n_on_tldr_posts_cuts_at_eos_and_reports_the_judge(tiny, tmp_path):
    folder, _ = tiny
    out = tmp_path / "bon.json"
    best_of_n.main(tyro.cli(best_of_n.Args, args=[
        "--reward_model", str(folder / "reward_model"), "--base_model", str(folder / "base"), "--query_dataset",
        str(TLDR), "--query_length", "160", "--response_length", "8", "--truncate_token", "eos", "--gold_labeler",
        "tldr_judge", "--num_queries", "4", "--max_n", "4", "--batch_size", "8", "--out", str(out)]))
    rows = json.loads(out.read_text())["rows"]
    assert [row["n"] for row in rows] == [1, 2, 4]
    assert all(row["gold"] <= 1 for row in rows) and all(a["proxy"] <= b["proxy"] + 1e-6 for a,
                                                         b in zip(rows, rows[1:]))
    # a random 1-layer model rarely samples EOS within 8 tokens: those samples get the penalty, -1, as PPO's rollouts do
    assert rows[0]["proxy"] < -0.5
