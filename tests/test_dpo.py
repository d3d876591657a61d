"""train_dpo.py: the DPO and IPO losses against a hand computation, pairs from best-of-n and pairwise labels, summed
response log-probs, tiny end-to-end runs (one process, LoRA, a run stopped and resumed; two processes in
test_distributed.py), and the LoRA reference (adapters off) against the base model (--load_in_4bit on a CPU:
test_lora.py)."""

import json
import math
import signal
import sys

import pytest
import torch
import train_dpo
from conftest import NANO, only_run, read_metrics, stable, stopped_midway, weights

TINY_DPO = ["--num_train", "32", "--num_test", "8", "--batch_size", "16", "--local_micro_batch_size", "8",
            "--num_eval", "8", "--eval_every", "2", "--local_rollout_forward_batch_size", "8"]


def test_dpo_loss_matches_a_hand_computation():
    chosen, rejected = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    ref_chosen, ref_rejected = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -2.0])
    beta = 0.1
    # h = (chosen - rejected) - (ref_chosen - ref_rejected) = (2 - 0, -1 - (-3)) = (2, 2)... the second one: (-4 + 3) -
    # (-5 + 2) = 2
    h = [2.0, 2.0]
    loss, stats = train_dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, "sigmoid")
    expected = sum(math.log(1 + math.exp(-beta * x)) for x in h) / 2  # -log sigmoid(z) = log(1 + e^-z)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["rewards/chosen"].item() == pytest.approx(beta * ((-10 + 11) + (-4 + 5)) / 2)
    assert stats["rewards/rejected"].item() == pytest.approx(beta * ((-12 + 11) + (-3 + 2)) / 2)
    assert stats["rewards/margins"].item() == pytest.approx(beta * 2)
    assert stats["rewards/accuracy"].item() == 1.0
    ipo, _ = train_dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, "ipo")
    assert ipo.item() == pytest.approx((2 - 1 / (2 * beta)) ** 2, rel=1e-6)  # (h - 1/(2 beta))^2 = (2 - 5)^2 = 9
    # the gradient of the sigmoid loss with respect to log pi(chosen): -beta sigmoid(-beta h) / b
    c = chosen.clone().requires_grad_()
    train_dpo.dpo_loss(c, rejected, ref_chosen, ref_rejected, beta, "sigmoid")[0].backward()
    assert c.grad[0].item() == pytest.approx(-beta / (1 + math.exp(beta * 2)) / 2, rel=1e-6)


def test_pairs_from_best_of_n_and_pairwise_labels():
    queries = torch.tensor([[5, 6], [7, 8]])  # (N=2, Q=2)
    samples = torch.arange(2 * 4 * 3).view(2, 4, 3)  # (N, n=4, R=3): sample j of label i is 12 i + 3 j + (0, 1, 2)
    q, chosen, rejected = train_dpo.preference_pairs(queries, samples, torch.tensor([1, 3]))
    assert q.tolist() == [[5, 6]] * 3 + [[7, 8]] * 3
    assert chosen.tolist() == [samples[0, 1].tolist()] * 3 + [samples[1, 3].tolist()] * 3
    assert rejected.tolist() == [samples[0, j].tolist() for j in (0, 2, 3)] + [samples[1, j].tolist() for j in (0, 1,
                                                                                                                2)]
    pairwise = torch.arange(2 * 2 * 3).view(2, 2, 3)  # column 0 chosen
    q, chosen, rejected = train_dpo.preference_pairs(queries, pairwise, torch.zeros(2, dtype=torch.long))
    assert q.tolist() == queries.tolist()
    assert chosen.tolist() == pairwise[:, 0].tolist() and rejected.tolist() == pairwise[:, 1].tolist()


def test_sequence_logprobs_sum_the_real_tokens_at_the_temperature():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6)  # (b, R, V)
    responses = torch.tensor([[2, 3, 4], [5, 1, 1]])  # pad 1: the second response has one real token
    got = train_dpo.sequence_logprobs(logits, responses, 0.7, pad_token_id=1)
    logp = torch.log_softmax(logits.index_fill(-1, torch.tensor([1]), -1e9 * 0.7) / 0.7, -1)
    assert got[0].item() == pytest.approx(sum(logp[0, t, responses[0, t]].item() for t in range(3)), rel=1e-5)
    assert got[1].item() == pytest.approx(logp[1, 0, 5].item(), rel=1e-5)


def nano_with_lora(r: int = 4):
    lm, tokenizer = train_dpo.prepare_lm(*train_dpo.load_base_model(str(NANO)))
    base = train_dpo.copy.deepcopy(lm)
    args = train_dpo.Args(lora_r=r)
    lora = train_dpo.add_lora(lm, args)
    with torch.no_grad():  # adapters as after some training (peft starts lora_B at 0)
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return lm, lora, base, tokenizer


def test_lora_reference_with_adapters_off_equals_the_base_model():
    lm, lora, base, tokenizer = nano_with_lora()
    tokens = torch.randint(2, 4000, (3, 20))
    reference = train_dpo.FrozenReference(lm, lora, torch.device("cpu"), torch.float32)
    assert reference.lm is lm  # no second copy
    # Bitwise equality needs the same kernels on both sides: Intel's MKL picks its matmul loop by the weights'
    # alignment, and weights left in the safetensors file's mapping (16-byte aligned) rounded differently from the deep
    # copy's (64-byte aligned) on an Intel Xeon; prepare_lm copies them out, so both models' weights are 64-byte
    # aligned.
    assert all(p.data_ptr() % 64 == 0 for model in (lm, base) for p in model.parameters())
    with torch.no_grad():
        expected = train_dpo.response_logits(base, tokens, tokenizer.pad_token_id, 8)
        policy = train_dpo.response_logits(lm, tokens, tokenizer.pad_token_id, 8)
    assert torch.equal(reference(tokens, tokenizer.pad_token_id, 8), expected)
    assert (policy - expected).abs().max() > 1e-3  # the adapters are on outside the reference
    trained = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)


def test_saved_lora_model_is_merged_and_equals_the_adapted_model():
    lm, lora, base, tokenizer = nano_with_lora()
    tokens = torch.randint(2, 4000, (2, 12))
    with torch.no_grad():
        adapted = train_dpo.response_logits(lm, tokens, tokenizer.pad_token_id, 4)
        merged = train_dpo.saved_lm(lm, lora)
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        assert torch.allclose(train_dpo.response_logits(merged, tokens, tokenizer.pad_token_id, 4), adapted, atol=1e-4)
        # the merged weights differ from the base ones by a matrix of rank at most r (GPT-2's c_attn, stored (in, out))
        delta = merged.transformer.h[0].attn.c_attn.weight - base.transformer.h[0].attn.c_attn.weight
    assert torch.linalg.matrix_rank(delta).item() <= 4


@pytest.mark.slow
def test_tiny_dpo_run_logs_the_figures_and_saves_a_policy(tmp_path, main):
    r = main(train_dpo, *TINY_DPO, "--run_root", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_metrics(tmp_path)
    assert metrics[0]["update"] == 0 and metrics[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)
    updates = [m for m in metrics if "loss/dpo" in m]
    assert len(updates) == 32 * 3 // 16  # 32 best-of-4 labels = 96 pairs, 6 updates of 16
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "lr"):
        assert key in updates[0]
    for key in ("objective/kl", "objective/gold_score", "test/rewards/accuracy", "test/loss"):
        assert key in updates[-1]
    assert updates[-1]["objective/kl"] > 0.01  # the policy has moved away from the reference
    run_dir = only_run(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["updates"] == 6 and "objective/gold_score/after" in summary
    assert (run_dir / "policy" / "model.safetensors").is_file()


@pytest.mark.slow
def test_dpo_under_lora_and_with_a_reward_model(tmp_path, tiny_reward_model, main):
    r = main(train_dpo, *TINY_DPO, "--lora_r", "4", "--reward_model", tiny_reward_model, "--run_root", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # rank 4 on c_attn, attn.c_proj, c_fc, mlp.c_proj of 4 layers: 4 x 16,384
    assert "65,536 trained parameters" in r.stdout
    metrics = read_metrics(tmp_path)
    assert "objective/scores" in metrics[0] and "objective/scores" in metrics[-1]
    saved = train_dpo.AutoModelForCausalLM.from_pretrained(only_run(tmp_path) / "policy")  # merged: a plain GPT-2
    assert not any("lora" in n for n, _ in saved.named_parameters())


@pytest.mark.slow
def test_stopped_and_resumed_dpo_run_ends_exactly_as_an_uninterrupted_one(tmp_path, tiny_models, main):
    flags = [*TINY_DPO, "--num_train", "64", "--save_every", "2", "--base_model", str(tiny_models / "base")]
    whole = main(train_dpo, *flags, "--run_root", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    stopped = stopped_midway([sys.executable, "train_dpo.py", *flags, "--run_root", str(tmp_path / "stopped")],
                             tmp_path / "stopped", "metrics.jsonl", after_lines=2)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    run_dir = only_run(tmp_path / "stopped")
    resumed = main(train_dpo, "--resume", run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert stable(run_dir / "metrics.jsonl") == stable(only_run(tmp_path / "whole") / "metrics.jsonl")
    assert weights(run_dir / "policy") == weights(only_run(tmp_path / "whole") / "policy")

