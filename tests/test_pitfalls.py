"""The pitfalls RLHF users keep hitting (docs/pitfalls.md), each with a test that fails if it comes back.

KL estimators: which of k1, k2, k3 is unbiased in value, as a reward and as a loss, computed exactly on a small
categorical distribution (Liu et al. 2025, https://arxiv.org/abs/2510.01555); the KL as a loss term.

Sampler against trainer: the training forward's log-probs equal the sampler's before any step (the temperature in
both); truncated importance weights scale the policy loss only.

Loss aggregation: DAPO's token mean, GRPO's per-response mean and Dr. GRPO's constant weigh each token as stated.

Gradient accumulation: an update must not depend on how a minibatch is cut into micro-batches. PPO's loss is the mean
over the minibatch's valid tokens (their count summed over micro-batches and processes), so under SFD's mask after the
truncate token, where responses keep different numbers of tokens, micro-batches of 1, 2 and the whole minibatch give
the same weights; the critic-free methods average responses and DPO pairs, equal in number in every micro-batch.

Where the score lands (TRL #3750), the no-EOS penalty with EOS in the prompt (TRL #6802), whitening in SFD's presets."""

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, only_run
from safetensors.torch import load_file

import train_dpo
import train_policy
import train_rloo

# KL estimators ---------------------------------------------------------------------------------------------------


def exact_expectations(estimator: str) -> dict:
    """For a policy softmax(theta) over 6 outcomes and a fixed reference, by enumeration (no sampling): the estimate's
    expected value, the expected gradient of the estimate used as a loss (the outcomes drawn from the policy, the
    drawing not differentiated: on-policy), and the policy gradient of the estimate used as a reward (the score
    function, sum_x grad pi(x) k(x) with k(x) held fixed); beside them the reverse KL(pi || ref), its gradient, and
    the gradient of the forward KL(ref || pi)."""
    torch.manual_seed(0)
    theta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(6, dtype=torch.float64).log_softmax(0)
    logp = theta.log_softmax(0)
    p = logp.exp()
    k = train_policy.kl_estimate(logp, ref, estimator)
    grad = lambda quantity: torch.autograd.grad(quantity, theta, retain_graph=True)[0]  # noqa: E731
    reverse_kl = (p * (logp - ref)).sum()
    return {"value": (p * k).sum().item(), "loss_grad": grad((p.detach() * k).sum()),
            "reward_grad": grad((p * k.detach()).sum()), "kl": reverse_kl.item(), "kl_grad": grad(reverse_kl),
            "forward_kl_grad": grad((ref.exp() * (ref - logp)).sum())}


def test_kl_estimators_bias_in_value_and_in_gradient_as_liu_et_al_derive():
    k1, k2, k3 = (exact_expectations(name) for name in ("k1", "k2", "k3"))
    same = lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-12)  # noqa: E731
    # value: k1 and k3 are unbiased estimates of KL(pi || ref), k2 is not
    assert k1["value"] == pytest.approx(k1["kl"], abs=1e-12) and k3["value"] == pytest.approx(k3["kl"], abs=1e-12)
    assert abs(k2["value"] - k2["kl"]) > 1e-2
    # in the reward (OAI's PPO, RLOO): k1's policy gradient is the reverse KL's; k2's and k3's are not
    assert same(k1["reward_grad"], k1["kl_grad"])
    assert not same(k2["reward_grad"], k2["kl_grad"]) and not same(k3["reward_grad"], k3["kl_grad"])
    # as a loss: k1's expected gradient is zero, k2's is the reverse KL's (as k1 in the reward), k3's (GRPO's) is
    # the forward KL(ref || pi)'s, another direction
    assert same(k1["loss_grad"], torch.zeros(6, dtype=torch.float64))
    assert same(k2["loss_grad"], k2["kl_grad"])
    assert same(k3["loss_grad"], k3["forward_kl_grad"]) and not same(k3["loss_grad"], k3["kl_grad"])
    # the copies in train_rloo.py compute the same
    logp, ref = torch.tensor([[-1.0, -0.2]]), torch.tensor([[-0.5, -0.9]])
    for name in ("k1", "k2", "k3"):
        assert torch.equal(train_rloo.kl_estimate(logp, ref, name), train_policy.kl_estimate(logp, ref, name))


@pytest.mark.slow
def test_the_kl_as_a_loss_term_leaves_the_reward_and_is_logged(tmp_path, tiny_models, main):
    """PPO with k2 in the loss: no KL in the reward (score_total is the score), ppo/loss/kl logged; RLOO with k2 in
    the loss and GRPO with k1 in the reward: each logs what it used."""
    tiny = ["--base_model", tiny_models / "base", "--reward_model", tiny_models / "reward_model", "--total_episodes",
            "32", "--batch_size", "16", "--nminibatches", "1", "--local_micro_batch_size", "8"]
    result = main(train_policy, *tiny, "--kl_estimator", "k2", "--kl_in", "loss", "--run_root", tmp_path / "ppo")
    assert result.returncode == 0, result.stderr
    metrics = [json.loads(line) for line in open(only_run(tmp_path / "ppo") / "metrics.jsonl")]
    assert all(m["objective/score_total"] == pytest.approx(m["objective/scores"], abs=1e-6) for m in metrics)
    assert all(m["ppo/loss/kl"] >= 0 for m in metrics) and metrics[-1]["ppo/loss/kl"] > 0
    runs = {"rloo": ["--kl_estimator", "k2", "--kl_in", "loss"], "grpo": ["--kl_estimator", "k1", "--kl_in", "reward"]}
    for advantage, flags in runs.items():
        result = main(train_rloo, *tiny, "--advantage", advantage, "--k", "4", *flags, "--run_root",
                      tmp_path / advantage)
        assert result.returncode == 0, result.stderr
        metrics = [json.loads(line) for line in open(only_run(tmp_path / advantage) / "metrics.jsonl")]
        assert ("policy/k2_kl" in metrics[-1]) == (advantage == "rloo") and "policy/k3_kl" not in metrics[-1]


# Sampler against trainer -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("module", [train_policy, train_rloo])
def test_the_training_forward_computes_the_samplers_log_probs_at_any_temperature(module, tmp_path, tiny_models, main):
    """TRL #4159: a temperature left out of one path makes the first update's ratio far from 1. Before the first
    optimizer step the training forward's log-probs equal the sampler's up to float error (fp32, temperature 0.6)."""
    result = main(module, "--base_model", tiny_models / "base", "--reward_model", tiny_models / "reward_model",
                  "--total_episodes", "32", "--batch_size", "16", "--nminibatches", "1", "--local_micro_batch_size",
                  "8", "--temperature", "0.6", "--run_root", tmp_path)
    assert result.returncode == 0, result.stderr
    for metrics in map(json.loads, open(only_run(tmp_path) / "metrics.jsonl")):
        assert metrics["mismatch/logprob_diff_max"] < 1e-4
        assert metrics["mismatch/response_ratio"] == pytest.approx(1.0, abs=1e-4)
    logits = torch.randn(2, 3, 7)
    sampled = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with_temperature, _ = train_policy.response_logprobs(logits, sampled, 0.6, 0)
    without = train_policy.response_logprobs(logits, sampled, 1.0, 0)[0]
    mismatch = train_policy.logprob_mismatch(without, with_temperature, torch.ones(2, 3, dtype=torch.bool))
    assert mismatch["mismatch/logprob_diff_max"] > 0.1  # what the metric shows when one path drops the temperature



def test_truncated_importance_weights_scale_each_tokens_policy_loss_only():
    torch.manual_seed(0)
    logp, old, v, old_v, adv, ret = (torch.randn(2, 4) for _ in range(6))
    valid = torch.ones(2, 4, dtype=torch.bool)
    args = (logp, v, old, old_v, adv, ret, valid, valid, 8, 8, 0.2, 0.2, 0.1)
    _, plain = train_policy.ppo_loss(*args)
    _, ones = train_policy.ppo_loss(*args, torch.ones(2, 4))
    _, halved = train_policy.ppo_loss(*args, torch.full((2, 4), 0.5))
    assert torch.equal(plain["ppo/loss/policy"], ones["ppo/loss/policy"])
    assert halved["ppo/loss/policy"].item() == pytest.approx(0.5 * plain["ppo/loss/policy"].item(), rel=1e-6)
    assert torch.equal(halved["ppo/loss/value"], plain["ppo/loss/value"])


def test_critic_free_importance_weights_are_capped_ratios_per_token_or_per_response():
    train, sampler = torch.tensor([[0.0, -1.0, -2.0]]), torch.tensor([[-0.5, -1.0, -1.0]])
    valid = torch.tensor([[True, True, False]])
    per_token = train_rloo.importance_weights(train, sampler, valid, 1.5, per_token=True)
    assert torch.allclose(per_token, torch.tensor([[1.5, 1.0, torch.e**-1]]))  # e^0.5 = 1.65 capped at 1.5
    per_response = train_rloo.importance_weights(train, sampler, valid, 2.0, per_token=False)
    assert torch.allclose(per_response, torch.tensor([0.5]).exp())  # the invalid third token leaves the product
    assert train_rloo.importance_weights(train, sampler, valid, 1.2, per_token=False).item() == pytest.approx(1.2)


@pytest.mark.parametrize("advantage", ["rloo", "grpo", "dr_grpo", "best_of_n"])
def test_critic_free_importance_weights_scale_the_policy_term_and_not_the_kl(advantage):
    torch.manual_seed(0)
    new, old, ref = (torch.randn(4, 3) for _ in range(3))
    advantages, valid = torch.tensor([1.0, 0.0, -1.0, 0.5]), torch.ones(4, 3, dtype=torch.bool)
    half = torch.full((4, 3) if advantage in ("grpo", "dr_grpo") else (4,), 0.5)

    def loss(beta, weights):
        return train_rloo.policy_loss(new, old, ref, advantages, valid, advantage, 0.2, beta, 2, "k3", "loss",
                                      weights=weights)[0].item()

    assert loss(0.0, half) == pytest.approx(0.5 * loss(0.0, None), rel=1e-6)
    assert loss(0.1, half) - loss(0.0, half) == pytest.approx(loss(0.1, None) - loss(0.0, None), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("module", [train_policy, train_rloo])
def test_truncated_importance_sampling_runs_and_logs_its_weights(module, tmp_path, tiny_models, main):
    """In fp32 sampler and trainer agree: every weight is 1 to float error and the cap (1.5) cuts none."""
    result = main(module, "--base_model", tiny_models / "base", "--reward_model", tiny_models / "reward_model",
                  "--total_episodes", "32", "--batch_size", "16", "--nminibatches", "1", "--local_micro_batch_size",
                  "8", "--tis_cap", "1.5", "--run_root", tmp_path)
    assert result.returncode == 0, result.stderr
    for metrics in map(json.loads, open(only_run(tmp_path) / "metrics.jsonl")):
        assert metrics["tis/weight_mean"] == pytest.approx(1.0, abs=1e-4) and metrics["tis/capped_fraction"] == 0


# Loss aggregation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_loss_aggregation_weights_each_token_as_dapo_grpo_and_dr_grpo_do(aggregation):
    """At the sampling policy (ratio 1, no KL) each token's gradient is -A over: all the minibatch's valid tokens
    (token, DAPO), its response's valid tokens times the responses (sequence, GRPO), response_length times the
    responses (constant, Dr. GRPO). The long response's tokens weigh less under sequence: the length bias."""
    old = torch.tensor([[-1.0, -2.0, -0.5, -0.1], [-0.3, -0.7, -1.1, -0.2]])
    new = old.clone().requires_grad_(True)
    valid = torch.tensor([[True, False, False, False], [True, True, True, True]])  # 1 and 4 valid tokens
    adv = torch.tensor([1.0, 1.0])
    loss, _ = train_rloo.policy_loss(new, old, old, adv, valid, "grpo", 0.2, 0.0, 2, "k3", "reward", aggregation,
                                     token_count=valid.sum())
    loss.backward()
    per_token = {"token": torch.full((2, 1), 1 / 5), "sequence": torch.tensor([[1 / 1], [1 / 4]]) / 2,
                 "constant": torch.full((2, 1), 1 / 4) / 2}[aggregation]
    torch.testing.assert_close(new.grad, -adv[:, None] * per_token * valid)


def test_loss_aggregation_is_refused_where_the_loss_is_not_per_token(tmp_path, main):
    result = main(train_rloo, "--advantage", "rloo", "--loss_aggregation", "token", "--run_root", tmp_path)
    assert result.returncode == 2 and not any(tmp_path.iterdir())
    assert result.stderr.strip().splitlines()[-1] == ("error: --loss_aggregation token applies to grpo's and "
                                                      "dr_grpo's token losses, not to --advantage rloo")


# Gradient accumulation -------------------------------------------------------------------------------------------

# float32 sums in another order: the weights' difference, relative to the update's size (||W_a - W_b|| / ||W_a - W_0||)
ACCUMULATION_TOLERANCE = 1e-4


def update_of(folder: Path, base: Path) -> tuple:
    """(the weights after training, the initial ones), each flattened into one vector."""
    trained, initial = load_file(folder / "model.safetensors"), load_file(base / "model.safetensors")
    names = sorted(name for name in trained if name in initial)
    return (torch.cat([trained[n].flatten().double() for n in names]),
            torch.cat([initial[n].flatten().double() for n in names]))


def relative_difference(a: Path, b: Path, base: Path) -> float:
    (wa, w0), (wb, _) = update_of(a, base), update_of(b, base)
    return ((wa - wb).norm() / (wa - w0).norm()).item()


@pytest.mark.slow
def test_a_ppo_update_with_ragged_valid_tokens_is_the_same_at_any_micro_batch_size(tmp_path, tiny_models, main):
    """One PPO update of 8 episodes, one minibatch, one epoch, on the nano model with SFD's mask after the first '.'
    (responses keep 2 to 16 tokens), at micro-batches of 1, 2 and 8 episodes."""
    flags = ["--base_model", "data/nano", "--reward_model", tiny_models / "reward_model", "--total_episodes", "8",
             "--batch_size", "8", "--nminibatches", "1", "--noptepochs", "1", "--truncate_token", ".",
             "--truncate_after", "2", "--mask_after_truncate", "--lr", "1e-4"]
    policies = {}
    for micro in (1, 2, 8):
        result = main(train_policy, *flags, "--local_micro_batch_size", micro, "--run_root", tmp_path / str(micro))
        assert result.returncode == 0, result.stderr
        policies[micro] = only_run(tmp_path / str(micro)) / "policy"
    (metrics,) = [json.loads(line) for line in open(only_run(tmp_path / "8") / "metrics.jsonl")]
    assert 0 < metrics["objective/truncated_fraction"] < 1  # ragged: some responses end early, some do not
    for micro in (1, 2):
        assert relative_difference(policies[micro], policies[8], ROOT / "data/nano") < ACCUMULATION_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("advantage, aggregation", [("grpo", []), ("grpo", ["--loss_aggregation", "token"]),
                                                    ("rloo", [])], ids=["grpo", "grpo-token", "rloo"])
def test_a_critic_free_update_is_the_same_at_any_micro_batch_size(advantage, aggregation, tmp_path, tiny_models,
                                                                   main):
    """One update of 4 prompts x k = 2 samples with SFD's mask after the first '.', at micro-batches of one prompt,
    two, and the whole minibatch: GRPO averages each response's tokens then the responses (or, DAPO's token
    aggregation, all the minibatch's tokens), RLOO the responses."""
    flags = [*aggregation, "--reward_model", tiny_models / "reward_model", "--advantage", advantage, "--k", "2",
             "--total_episodes",
             "8", "--batch_size", "8", "--nminibatches", "1", "--noptepochs", "1", "--truncate_token", ".",
             "--truncate_after", "2", "--mask_after_truncate", "--lr", "1e-4",
             "--local_rollout_forward_batch_size", "8"]
    policies = {}
    for micro in (2, 4, 8):
        result = main(train_rloo, *flags, "--local_micro_batch_size", micro, "--run_root", tmp_path / str(micro))
        assert result.returncode == 0, result.stderr
        policies[micro] = only_run(tmp_path / str(micro)) / "policy"
    for micro in (2, 4):
        assert relative_difference(policies[micro], policies[8], ROOT / "data/nano") < ACCUMULATION_TOLERANCE


@pytest.mark.slow
def test_a_dpo_update_is_the_same_at_any_micro_batch_size(tmp_path, tiny_models, main):
    """One DPO step on 8 pairs at micro-batches of 1, 2 and 8 pairs, on the 1-layer model: the loss is the mean over
    pairs."""
    flags = ["--base_model", tiny_models / "base", "--num_train", "8", "--num_test", "8", "--batch_size", "8",
             "--num_eval", "8", "--eval_every", "100"]
    policies = {}
    for micro in (1, 2, 8):
        result = main(train_dpo, *flags, "--local_micro_batch_size", micro, "--run_root", tmp_path / str(micro))
        assert result.returncode == 0, result.stderr
        policies[micro] = only_run(tmp_path / str(micro)) / "policy"
    for micro in (1, 2):
        assert relative_difference(policies[micro], policies[8], tiny_models / "base") < ACCUMULATION_TOLERANCE


# Where the score lands, the no-EOS penalty, whitening -----------------------------------------------------------------


def test_the_no_eos_penalty_looks_at_the_response_only_even_when_the_prompt_holds_eos():
    """TRL #6802: a penalty computed on query + response is a no-op when the prompt itself contains EOS. Ours reads the
    response tokens alone: a prompt full of EOS changes nothing."""
    eos, pad = 5, 0
    queries = torch.tensor([[eos, 7, eos], [eos, eos, eos]])
    responses = torch.tensor([[3, 4, 6, 8], [3, eos, 6, 8]])  # the first never ends, the second ends at its 2nd token
    truncated = train_policy.truncate_responses(responses, eos, 0, pad)
    scores = train_policy.penalize(torch.tensor([2.0, 3.0]), truncated, eos, 0, -1.0)
    assert scores.tolist() == [-1.0, 3.0]
    assert torch.equal(queries[:, -1], torch.tensor([eos, eos]))  # the prompts end with EOS; the penalty did not see it


def test_the_score_lands_after_the_eos_under_sfds_mask_and_at_the_last_token_otherwise():
    """TRL #3750: a score read at the first pad instead of the last real token. The reward model reads the last real
    token, right pads included (test_policy.py::test_reward_is_read_at_the_last_token_and_scaled_by_gain_and_bias);
    here the per-token reward it is added to: under SFD's mask the position right after the EOS, whose value the value
    mask keeps, or the last token of a response that never ended; OAI's whole responses: the last token."""
    pad, eos = 0, 5
    truncated = torch.tensor([[3, eos, pad, pad], [3, 4, 6, 8]])
    _, _, score_index = train_policy.response_masks(truncated, pad, mask_after_truncate=True)
    assert score_index.tolist() == [2, 3]  # {SFD}/ppo.py#L683-L685: the token after EOS, or the last one
    _, _, score_index = train_policy.response_masks(truncated, pad, mask_after_truncate=False)
    assert score_index.tolist() == [3, 3]  # OAI: the last token


def test_sfds_presets_turn_reward_whitening_off_and_oais_keep_it():
    for preset in ("tldr", "tldr_twin"):
        assert train_policy.PRESETS[preset]["whiten_rewards"] is False  # {SFD}/ppo.py: whiten_rewards False
    assert train_policy.PRESETS["sentiment"]["whiten_rewards"] is True  # {OAI}/train_policy.py#L319-L339
