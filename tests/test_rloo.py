"""train_rloo.py: each estimator against a hand computation, the k3 KL estimator, the losses at ratio 1, the shared
prompt forward against the whole rows, a tiny run per estimator, and a run stopped by SIGTERM and resumed that ends as
an uninterrupted one, in one process and in two."""

import json
import math
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_RLOO, long_rloo, only_run, read_metrics, stable, stopped_midway, weights

import train_rloo as tr


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 4.0])
    # prompt 1: 1 - (2 + 3) / 2, 2 - (1 + 3) / 2, 3 - (1 + 2) / 2; prompt 2: equal rewards, nothing to prefer
    assert tr.rloo_advantages(rewards, 3).tolist() == [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]
    assert tr.rloo_advantages(torch.tensor([0.0, 1.0]), 2).tolist() == [-1.0, 1.0]


def test_grpo_normalises_by_the_group_std_and_handles_one_sample_and_equal_rewards():
    adv = tr.grpo_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2)
    # unbiased std of (1, 3)
    assert adv[:2].tolist() == pytest.approx([-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)])
    assert adv[2:].tolist() == [0.0, 0.0]
    # k = 1: no group, no advantage, no NaN
    assert tr.grpo_advantages(torch.tensor([0.3, -2.0]), 1).tolist() == [0.0, 0.0]


def test_dr_grpo_keeps_the_scale_and_best_of_n_picks_the_first_best():
    assert tr.dr_grpo_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2).tolist() == [-1.0, 1.0, 0.0, 0.0]
    assert tr.best_of_n_weights(torch.tensor([0.1, 0.5, 0.5, 0.2, -1.0, -3.0]), 3).tolist() == [0, 1, 0, 1, 0, 0]


def test_k3_kl_estimator():
    logp, ref = torch.tensor([-1.0, -0.5]), torch.tensor([-2.0, -0.5])
    assert tr.kl_estimate(logp, ref, "k3").tolist() == pytest.approx([math.exp(-1) + 1 - 1, 0.0])
    # unbiased: its mean under samples of p is KL(p || q)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    exact = (p * (p / q).log()).sum()
    assert (p * tr.kl_estimate(p.log(), q.log(), "k3")).sum() == pytest.approx(exact.item(), rel=1e-6)


def test_kl_goes_into_the_reward_or_into_the_loss():
    scores, logp, ref = torch.tensor([1.0, 2.0]), torch.tensor([[-1.0, -1.0],
                                                                [-2.0, -1.0]]), torch.tensor([[-1.5, -1.0],
                                                                                              [-1.0, -1.0]])
    valid = torch.tensor([[True, True], [True, False]])
    assert tr.kl_placement("rloo", None, None) == tr.kl_placement("best_of_n", None, None) == ("k1", "reward")
    assert tr.kl_placement("grpo", None, None) == tr.kl_placement("dr_grpo", None, None) == ("k3", "loss")
    assert tr.kl_placement("grpo", "k2", "reward") == ("k2", "reward")
    rewards = tr.sequence_rewards(scores, logp, ref, valid, "k1", "reward", 0.1)
    assert rewards.tolist() == pytest.approx([1.0 - 0.05, 2.0 + 0.1])
    assert tr.sequence_rewards(scores, logp, ref, valid, "k3", "loss", 0.1).tolist() == [1.0, 2.0]
    # k2 in the reward: 0.1 x (0.5^2 / 2) on the first response; the second's only valid token has d = -1
    assert tr.sequence_rewards(scores, logp, ref, valid, "k2", "reward", 0.1).tolist() == pytest.approx(
        [1.0 - 0.0125, 2.0 - 0.05])


@pytest.mark.parametrize("advantage", ["rloo", "grpo", "dr_grpo", "best_of_n"])
def test_losses_at_the_sampling_policy(advantage):
    """With the policy still the sampling one (ratio 1) each loss is the advantage-weighted log-likelihood, scaled as
    its paper scales it; its gradient is -A x grad log pi."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]])
    new = old.clone().requires_grad_(True)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([1.0, -2.0]) if advantage != "best_of_n" else torch.tensor([0.0, 1.0])
    loss, stats = tr.policy_loss(new, old, old, adv, valid, advantage, cliprange=0.2, beta=0.0, k=2,
                                 kl_estimator="k3", kl_in="loss")
    loss.backward()
    n = valid.sum(1, keepdim=True).float()
    expected_grad = {"rloo": -adv[:, None] / 2, "grpo": -adv[:, None] / n / 2, "dr_grpo": -adv[:, None] / 3 / 2,
                     "best_of_n": -adv[:, None] * 2 / 3 / 2}[advantage] * valid
    assert torch.allclose(new.grad, expected_grad)
    assert stats["policy/approxkl"] == 0 and stats.get("policy/clipfrac", 0) == 0


def test_rloo_clips_the_sequence_ratio():
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.3, 0.2]])  # sequence ratio e^0.5 = 1.65, beyond 1.2
    loss, stats = tr.policy_loss(new, old, old, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), "rloo",
                                 cliprange=0.2, beta=tr.Args().beta, k=tr.Args().k, kl_estimator="k1",
                                 kl_in="reward")
    assert loss.item() == pytest.approx(-1.2) and stats["policy/clipfrac"] == 1.0


def test_shared_prompt_logprobs_equal_the_whole_rows_and_so_do_their_gradients():
    """Each prompt run once for its k responses gives the log-probs of response_logits of the concatenated rows, under
    left padding of different lengths and pads inside the responses (truncated ones), and the same gradients. With
    keep, the output layer sees the kept positions only, which keep their log-probs and gradients; the others are 0.
    Different batch shapes run different matmul blocks, so equal within 1e-5, not bitwise."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2, pad_token_id=1,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # no dropout: deterministic
    pad, k, R, T = 1, 3, 5, 0.7
    prompts = torch.randint(2, 64, (2, 6))
    prompts[0, :2] = pad  # left padding of two lengths
    prompts[1, :4] = pad
    responses = torch.randint(2, 64, (2 * k, R))
    responses[1, 3:] = pad  # truncated: pads after the truncation token
    real = responses != pad  # a pad's own log-prob is never scored
    keep = real.clone()
    keep[0, 2:] = keep[4, 0] = False  # positions no loss reads, the first one included
    whole_rows = torch.cat([prompts.repeat_interleave(k, 0), responses], 1)
    rows_seen = []
    lm.get_output_embeddings().register_forward_hook(lambda module, inputs, out: rows_seen.append(out.shape[:-1]))
    for kept in (real, keep):
        whole, whole_entropy = tr.response_logprobs(tr.response_logits(lm, whole_rows, pad, R), responses, T, pad)
        whole[kept].sum().backward()
        expected = [p.grad.clone() for p in lm.parameters()]
        lm.zero_grad()
        rows_seen.clear()
        shared, entropy = tr.shared_prompt_logprobs(lm, prompts, responses, pad, T, kept)
        assert shared.shape == entropy.shape == (2 * k, R)
        assert rows_seen == [(2, 1), (int(kept[:, 1:].sum()),)]  # the prompts' last positions, then the kept others
        assert torch.allclose(shared[kept], whole[kept], atol=1e-5)
        assert torch.allclose(entropy[kept], whole_entropy[kept], atol=1e-5)
        assert (shared[~kept] == 0).all() and (entropy[~kept] == 0).all()
        shared.sum().backward()
        for p, e in zip(lm.parameters(), expected):
            assert torch.allclose(p.grad, e, atol=1e-5)
        lm.zero_grad()
    with torch.no_grad():  # one-token responses: the prompt's pass alone; no keep is all kept; no entropy asked
        one = tr.response_logprobs(tr.response_logits(lm, whole_rows[:, :7], pad, 1), responses[:, :1], T, pad)[0]
        shared, entropy = tr.shared_prompt_logprobs(lm, prompts, responses[:, :1], pad, T, entropy=False)
    assert torch.allclose(shared, one, atol=1e-5) and entropy is None


def test_micro_batches_hold_whole_prompts(tmp_path, tiny_reward_model, main):
    r = main(tr, "--k", "4", "--batch_size", "48", "--local_micro_batch_size", "6", "--reward_model", tiny_reward_model,
             "--run_root", tmp_path)
    assert r.returncode == 2 and "multiples of --k 4" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("advantage", ["rloo", "grpo", "dr_grpo", "best_of_n"])
def test_tiny_run_per_estimator(advantage, tmp_path, tiny_reward_model, main):
    r = main(tr, *TINY_RLOO, "--advantage", advantage, "--reward_model", tiny_reward_model, "--run_root", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_metrics(tmp_path)
    assert len(metrics) == 2
    for key in ("objective/kl", "objective/scores", "objective/gold_score", "objective/entropy", "loss/policy",
                "objective/advantage_std"):
        assert math.isfinite(metrics[0][key]), key
    assert metrics[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    if advantage in ("grpo", "dr_grpo"):
        assert "policy/k3_kl" in metrics[0]
    run_dir = only_run(tmp_path)
    assert (run_dir / "policy" / "model.safetensors").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["updates"] == 2


@pytest.mark.slow
def test_max_grad_norm_clips_each_step_and_the_norm_before_it_is_logged(tmp_path, tiny_reward_model, main):
    """Clipped to 1e-9, each gradient is so small against Adam's epsilon (1e-5) that the policy stays within 1e-7 of
    where it started; unclipped, the same run moves it. The norm before clipping is logged either way: at the first
    update (one optimizer step, from the same policy) the same."""
    from safetensors.torch import load_file

    start = load_file("data/nano/model.safetensors")
    moved, norms = {}, {}
    for clip in ("inf", "1e-9"):
        r = main(tr, *TINY_RLOO, "--nminibatches", "1", "--noptepochs", "1", "--max_grad_norm", clip,
                 "--reward_model", tiny_reward_model, "--run_root", tmp_path / clip)
        assert r.returncode == 0, r.stderr[-3000:]
        norms[clip] = read_metrics(tmp_path / clip)[0]["policy/grad_norm"]
        end = load_file(only_run(tmp_path / clip) / "policy" / "model.safetensors")
        moved[clip] = max((end[name] - start[name]).abs().max().item() for name in start)
    assert norms["inf"] > 0 and norms["1e-9"] == pytest.approx(norms["inf"], rel=1e-4)
    assert moved["1e-9"] < 1e-7 < 1e-5 < moved["inf"], moved  # Adam moves a weight by about lr (5e-5) a step


def test_rloo_needs_two_samples_per_prompt_and_whole_prompts_per_process(tmp_path, tiny_reward_model, main):
    r = main(tr, "--k", "1", "--reward_model", tiny_reward_model, "--run_root", tmp_path)
    assert r.returncode == 2 and "--k 1" in r.stderr
    r = main(tr, "--k", "3", "--reward_model", tiny_reward_model, "--run_root", tmp_path)
    assert r.returncode == 2 and "not divisible by --k 3" in r.stderr and not list(tmp_path.iterdir())


def stop_and_resume(head: list, flags: list, tmp_path, resume) -> Path:
    """The run stopped by SIGTERM after its first update or so, then resumed by resume(run folder); its folder."""
    stopped = stopped_midway([*head, "train_rloo.py", *flags, "--run_root", str(tmp_path / "parts")],
                             tmp_path / "parts", "metrics.jsonl", after_lines=1)
    assert "stopped by SIGTERM" in stopped.stdout, stopped.stderr[-3000:]
    if len(head) == 1:
        assert stopped.returncode == 128 + signal.SIGTERM
    run_dir = only_run(tmp_path / "parts")
    resumed = resume(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_stopped_and_resumed_run_ends_as_uninterrupted(tmp_path, tiny_models, main):
    """Against an uninterrupted run in this process (one thread, as a launched process computes: the same kernels);
    resumed here too."""
    flags = long_rloo(tiny_models)
    whole = main(tr, *flags, "--run_root", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    run_dir = stop_and_resume([sys.executable], flags, tmp_path, lambda run_dir: main(tr, "--resume", run_dir))
    assert stable(only_run(tmp_path / "whole") / "metrics.jsonl") == stable(run_dir / "metrics.jsonl")
    assert weights(only_run(tmp_path / "whole") / "policy") == weights(run_dir / "policy")


