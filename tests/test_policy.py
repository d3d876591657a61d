"""Unit tests of train_policy.py: one (or more) per implementation detail of DESIGN.md (see docs/ppo.md)."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import NANO
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

import train_policy as tp


@pytest.fixture(scope="module")
def nano():
    tokenizer = AutoTokenizer.from_pretrained(NANO)
    return tp.prepare_lm(AutoModelForCausalLM.from_pretrained(NANO), tokenizer)


def tiny_lm(vocab=64, pad=1):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2, pad_token_id=pad,
                        resid_pdrop=0.1)
    return GPT2LMHeadModel(config)


# 1, 2. dedicated pad token; left padding with explicit positions --------------------------------------------


def test_a_model_without_pad_token_gets_a_dedicated_one_not_eos(nano):
    model, tokenizer = nano
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    tok = AutoTokenizer.from_pretrained(NANO)
    tok.pad_token = tok.eos_token  # as gpt2 users often do: prepare_lm must undo it with a new token
    lm, tok = tp.prepare_lm(tiny_lm(vocab=len(tok)), tok)
    assert tok.pad_token_id not in (tok.eos_token_id,) and tok.pad_token == "[PAD]"
    assert lm.get_input_embeddings().num_embeddings == len(tok)


def test_padded_and_unpadded_inputs_give_the_same_logits_values_and_rewards(nano):
    model, tokenizer = nano
    pad = tokenizer.pad_token_id
    ids = torch.tensor([tokenizer.encode("The rain stopped. She smiled at the old dog.")])
    left = torch.cat([torch.full((1, 5), pad), ids], 1)
    policy = tp.PolicyAndValue(model).eval()
    torch.nn.init.normal_(policy.value_head.weight)  # nonzero so that values are compared too
    with torch.no_grad():
        R = ids.shape[1] - 3  # the last 3 tokens stand in for a query
        logits, values = policy(ids, pad, R)
        logits_l, values_l = policy(left, pad, R)
        assert logits.shape == (1, R, len(tokenizer)) and values.shape == (1, R)
        torch.testing.assert_close(logits_l, logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(values_l, values, atol=1e-4, rtol=1e-4)
        # the logits of the R positions that predict the response: the full forward's positions Q-1 .. Q+R-2
        full = model(**tp.model_inputs(ids, pad)).logits[:, -R - 1 : -1]
        torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(tp.response_logits(model, left, pad, R), full, atol=1e-4, rtol=1e-4)
        reward_model = tp.RewardModel(model).eval()
        right = torch.cat([left, torch.full((1, 3), pad)], 1)  # a truncated response ends in pads
        r = reward_model(ids, pad)
        torch.testing.assert_close(reward_model(left, pad), r, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(reward_model(right, pad), r, atol=1e-4, rtol=1e-4)


# 3. fixed-length sampling at a temperature ---------------------------------------------------------------------


def tiny_llama(vocab: int, pad: int):
    """SmolLM2's architecture (llama: RoPE, grouped-query attention, RMSNorm, tied embeddings) at toy size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=pad)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sampling_is_fixed_length_never_pads_and_matches_the_temperature_logprobs(nano, arch):
    model, tokenizer = nano
    pad = tokenizer.pad_token_id
    model = model if arch == "gpt2" else tiny_llama(len(tokenizer), pad)
    texts = ["It was a cold morning.", "The dog slept. Then it rained all day long and nobody came.", "Hello."]
    # (66, 16)
    queries = torch.tensor([[pad] * (16 - len(ids)) + ids for ids in (tokenizer.encode(t)[:16] for t in texts)] * 22)
    policy = tp.PolicyAndValue(model).eval()
    torch.nn.init.normal_(policy.value_head.weight)
    sampler = tp.Sampler(model, pad, 0.7)
    torch.manual_seed(0)
    responses, logprobs, entropies, values = sampler(queries, 12, policy.value_head)
    assert responses.shape == logprobs.shape == entropies.shape == values.shape == (66,
                                                                                    12) and not (responses == pad).any()
    # what the sampler computed at each step with its static KV cache equals one forward over query+response
    # (today's path: full logits (b, R, V)), so the rollout's log-probs, entropies and values are the policy's
    with torch.no_grad():
        full_logits, full_values = policy(torch.cat([queries, responses], 1), pad, 12)
    full_logprobs, full_entropies = tp.response_logprobs(full_logits, responses, 0.7, pad)
    torch.testing.assert_close(logprobs, full_logprobs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(entropies, full_entropies, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values, full_values, atol=1e-4, rtol=1e-4)
    # the cache is reset and reused by the next call of the same shape, and made anew for another shape
    cache = sampler.cache
    again = sampler(queries, 12, policy.value_head)
    assert sampler.cache is cache
    with torch.no_grad():
        torch.testing.assert_close(again[1],
                                   tp.response_logprobs(policy(torch.cat([queries, again[0]], 1), pad, 12)[0],
                                                        again[0], 0.7, pad)[0], atol=1e-4, rtol=1e-4)
    assert sampler(queries[:5], 3)[0].shape == (5, 3) and sampler.cache is not cache
    # the first token's empirical distribution follows softmax(logits / T) with the pad token removed
    with torch.no_grad():
        logits = model(**tp.model_inputs(queries[:1], pad)).logits[0, -1]
    p = torch.softmax(tp.sampling_logits(logits, 0.7, pad), -1)
    assert p[pad] == 0 and p.sum().item() == pytest.approx(1.0, abs=1e-5)
    top = p.argmax().item()
    first = responses[0::3, 0]  # the 22 rows of the first query
    assert (first == top).float().mean().item() == pytest.approx(p[top].item(), abs=0.25)


def test_inverse_cdf_sampling_follows_the_probabilities_and_never_draws_a_zero():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 1.0]]).repeat(20000, 1)  # (40000, 4)
    torch.manual_seed(0)
    tokens = tp.sample_token(probs).squeeze(1)
    first, second = tokens[0::2], tokens[1::2]
    freq = torch.bincount(first, minlength=4).float() / len(first)
    torch.testing.assert_close(freq, probs[0], atol=0.01, rtol=0)  # binomial std ~0.0035
    assert (first != 1).all() and (second == 3).all()
    unnormalized = tp.sample_token(torch.tensor([[2.0, 0.0, 6.0]]).repeat(20000, 1)).squeeze(1)  # mass 8, not 1
    assert (unnormalized == 2).float().mean().item() == pytest.approx(0.75, abs=0.01) and (unnormalized != 1).all()


def test_logprobs_divide_the_logits_by_the_temperature():
    logits = torch.randn(2, 7, 10)
    responses = torch.randint(2, 10, (2, 3))
    logp, entropy = tp.response_logprobs(logits[:, 3:6], responses, 0.5, pad_token_id=0)
    expected = torch.log_softmax(tp.sampling_logits(logits[:, 3:6], 0.5, 0),
                                 -1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logp, expected)
    manual = torch.log_softmax(torch.cat([torch.full((2, 3, 1), -1e9), logits[:, 3:6, 1:] / 0.5], -1), -1)
    torch.testing.assert_close(logp, manual.gather(-1, responses.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(entropy, -(manual.exp() * manual).sum(-1))


def test_the_entropy_is_a_statistic_outside_the_graph_and_the_logits_stay_as_they_were():
    logits = torch.randn(2, 3, 10, requires_grad=True)
    kept = logits.detach().clone()
    responses = torch.randint(2, 10, (2, 3))
    logp, entropy = tp.response_logprobs(logits, responses, 0.7, pad_token_id=0)
    assert logp.requires_grad and not entropy.requires_grad
    torch.testing.assert_close(logits.detach(), kept)  # the pad's column is filled in a copy, not in the model's logits
    without, none = tp.response_logprobs(logits, responses, 0.7, pad_token_id=0, entropy=False)
    assert none is None and torch.equal(without, logp)
    logp.sum().backward()  # the pad, never sampled, gets no gradient
    assert (logits.grad[..., 0] == 0).all() and (logits.grad[..., 1:] != 0).any()


# 4. truncation and the -1 penalty -------------------------------------------------------------------------


def test_truncation_pads_after_the_first_truncate_token_at_or_after_truncate_after():
    dot, pad = 5, 0
    r = torch.tensor([[1, 5, 2, 5, 3, 5, 4], [1, 2, 3, 4, 5, 6, 7], [5, 1, 2, 3, 4, 6, 7]])
    out = tp.truncate_responses(r, dot, truncate_after=2, pad_token_id=pad)
    assert out.tolist() == [[1, 5, 2, 5, 0, 0, 0], [1, 2, 3, 4, 5, 0, 0], [5, 1, 2, 3, 4, 6, 7]]


@pytest.mark.parametrize("after", [0, 1, 2, 3, 4])
def test_penalty_applies_exactly_when_no_truncate_token_at_or_after_truncate_after(after):
    dot = 5
    r = torch.tensor([[5, 1, 1, 1], [1, 5, 1, 1], [1, 1, 5, 1], [1, 1, 1, 5], [1, 1, 1, 1]])
    scores = torch.tensor([0.3, 0.4, 0.5, 0.6, 0.7])
    out = tp.penalize(scores, r, dot, after, -1.0)
    for i in range(5):
        has = any(r[i, j] == dot for j in range(after, 4))
        assert out[i].item() == pytest.approx(scores[i].item() if has else -1.0)


# 5. reward at the last token; head init ---------------------------------------------------------------------


def test_reward_is_read_at_the_last_token_and_scaled_by_gain_and_bias():
    lm = tiny_lm()
    rm = tp.RewardModel(lm).eval()
    assert rm.head.bias.item() == 0
    big = tp.RewardModel(GPT2LMHeadModel(GPT2Config(vocab_size=8, n_embd=2048, n_layer=1, n_head=1)))
    assert big.head.weight.std().item() == pytest.approx(1 / math.sqrt(2048 + 1), rel=0.1)
    tokens = torch.tensor([[1, 1, 7, 8, 9, 10], [1, 11, 12, 13, 14, 1]])
    with torch.no_grad():
        rm.gain.fill_(2.0)
        rm.bias.fill_(0.5)
        hidden = lm.base_model(**tp.model_inputs(tokens, 1)).last_hidden_state
        expected = 2.0 * rm.head(torch.stack([hidden[0, 5], hidden[1, 4]])).squeeze(-1) + 0.5
        torch.testing.assert_close(rm(tokens, 1), expected)


def test_reward_model_checkpoint_round_trip(tmp_path, nano):
    model, tokenizer = nano
    rm = tp.RewardModel(model)
    with torch.no_grad():
        rm.gain.fill_(1.7)
        rm.bias.fill_(-0.3)
    tp.save_reward_model(rm, tokenizer, tmp_path / "rm")
    loaded, tok = tp.load_reward_model(str(tmp_path / "rm"))
    tokens = torch.tensor([tokenizer.encode("A warm day at the lake.")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens, tok.pad_token_id), rm.eval()(tokens, tokenizer.pad_token_id))
    assert loaded.gain.item() == pytest.approx(1.7) and loaded.bias.item() == pytest.approx(-0.3)


# 8. value head init 0; dropout off ----------------------------------------------------------------------------


def test_value_head_starts_at_zero_and_dropout_is_off():
    lm, _ = tp.prepare_lm(tiny_lm(), SimpleNamespace(pad_token="x", pad_token_id=1, eos_token_id=0))
    policy = tp.PolicyAndValue(lm)
    assert policy.value_head.weight.abs().sum() == 0 and policy.value_head.bias.abs().sum() == 0
    assert all(m.p == 0 for m in lm.modules() if isinstance(m, torch.nn.Dropout))
    policy.train()
    tokens = torch.randint(2, 64, (2, 8))
    a, b = policy(tokens, 1, 4)[0], policy(tokens, 1, 4)[0]
    torch.testing.assert_close(a, b)  # train mode, yet deterministic: no dropout


def test_prepare_lm_swaps_gpt2_gelu_for_the_same_formula_in_one_kernel():
    from transformers.activations import GELUTanh, NewGELUActivation

    lm = tiny_lm().eval()
    tokens = torch.randint(2, 64, (2, 8))
    with torch.no_grad():
        before = lm(input_ids=tokens).logits
        lm, _ = tp.prepare_lm(lm, SimpleNamespace(pad_token="x", pad_token_id=1, eos_token_id=0))
        after = lm(input_ids=tokens).logits
    assert not any(isinstance(m, NewGELUActivation) for m in lm.modules())
    assert sum(isinstance(m, GELUTanh) for m in lm.modules()) == lm.config.n_layer
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(GELUTanh()(x),
                               0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))))  # OAI's gelu


# 9. per-token KL penalty, score at the last token ----------------------------------------------------------------


def test_rewards_are_minus_kl_per_token_plus_the_score_at_the_last_token():
    logp, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -1.0, -0.5]])
    rewards, non_score = tp.compute_rewards(torch.tensor([3.0]), tp.kl_estimate(logp, ref, "k1"), 0.2,
                                            torch.tensor([2]))
    torch.testing.assert_close(non_score, torch.tensor([[-0.1, 0.2, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.1, 0.2, 3.0]]))


# 10. adaptive KL controller ---------------------------------------------------------------------------------------


def test_adaptive_kl_controller_follows_oai_formula():
    ctl = tp.AdaptiveKLController(0.15, target=6.0, horizon=10000)
    value = 0.15
    for kl, n in [(6.0, 512), (12.0, 512), (3.0, 512), (6.6, 512), (0.0, 64), (100.0, 10000)]:
        ctl.update(kl, n)
        value *= 1 + max(-0.2, min(0.2, kl / 6.0 - 1)) * n / 10000
        assert ctl.value == pytest.approx(value, rel=1e-12)
    assert tp.FixedKLController(0.1).value == 0.1


# 11. whitening ------------------------------------------------------------------------------------------------------


def test_whiten_uses_the_biased_variance_and_can_keep_the_mean():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 9.0]])
    mean, var = x.mean(), ((x - x.mean()) ** 2).mean()  # tf.nn.moments: divide by n, not n - 1
    torch.testing.assert_close(tp.whiten(x), (x - mean) / torch.sqrt(var + 1e-8))
    kept = tp.whiten(x, shift_mean=False)
    torch.testing.assert_close(kept, (x - mean) / torch.sqrt(var + 1e-8) + mean)
    assert kept.mean().item() == pytest.approx(mean.item(), abs=1e-6)
    assert tp.whiten(x).var(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)


# 12. GAE ------------------------------------------------------------------------------------------------------------


def test_gae_matches_a_plain_backwards_loop():
    torch.manual_seed(0)
    values, rewards = torch.randn(3, 6), torch.randn(3, 6)
    gamma, lam = 0.9, 0.95
    adv, ret = tp.compute_gae(values, rewards, gamma, lam)
    for b in range(3):
        last = 0.0
        for t in reversed(range(6)):
            next_value = values[b, t + 1].item() if t < 5 else 0.0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            last = delta + gamma * lam * last
            assert adv[b, t].item() == pytest.approx(last, abs=1e-5)
            assert ret[b, t].item() == pytest.approx(last + values[b, t].item(), abs=1e-5)
    # gamma = lam = 1: the advantage is the sum of future rewards minus the value
    adv1, _ = tp.compute_gae(values, rewards, 1.0, 1.0)
    torch.testing.assert_close(adv1, rewards.flip(1).cumsum(1).flip(1) - values)


# 13. clipped policy and value losses ----------------------------------------------------------------------------------


def test_ppo_losses_clip_the_ratio_and_take_the_max_of_value_errors():
    old_logp = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.9]]))  # ratios
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    old_v, v, ret = torch.zeros(1, 4), torch.tensor([[0.5, -0.5, 0.1, 0.0]]), torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    everything = torch.ones(1, 4, dtype=torch.bool)
    loss, stats = tp.ppo_loss(logp, v, old_logp, old_v, adv, ret, everything, everything, 4, 4, cliprange=0.2,
                              cliprange_value=0.2, vf_coef=0.1)
    # pg: max(-A r, -A clip(r)) per token: 1.5->clip 1.2: max(-1.5,-1.2) = -1.2; 0.5->0.8 for A=-1: max(0.5, 0.8) = 0.8
    pg = torch.tensor([-1.2, 0.8, -1.1, 0.9]).mean()
    # vf: clipped vpred = 0.2, -0.2, 0.1, 0; max of squared errors
    vf = 0.5 * torch.tensor([max(0.25, 0.64), max(2.25, 1.44), max(0.01, 0.01), 0.0]).mean()
    assert stats["ppo/loss/policy"].item() == pytest.approx(pg.item(), abs=1e-6)
    assert stats["ppo/loss/value"].item() == pytest.approx(vf.item(), abs=1e-6)
    assert loss.item() == pytest.approx(pg.item() + 0.1 * vf.item(), abs=1e-6)
    assert stats["ppo/policy/clipfrac"].item() == pytest.approx(0.5)
    assert stats["ppo/val/clipfrac"].item() == pytest.approx(0.25)
    assert stats["ppo/policy/approxkl"].item() == pytest.approx(0.5 * (logp**2).mean().item(), abs=1e-6)


# 15 is tested in test_pipeline (lr logged per update); 16. TF-style vs PyTorch Adam ------------------------------


def test_tf_style_adam_uses_epsilon_hat_and_differs_from_pytorch_adam_on_small_gradients():
    lr, eps = 1e-3, 1e-5
    for g, tf_expected, pt_expected in [
        (1.0, lr * 1.0 / (1.0 + eps / math.sqrt(1 - 0.999)), lr * 1.0 / (1.0 + eps)),
        (1e-5, lr * 1e-5 / (1e-5 + eps / math.sqrt(1 - 0.999)), lr * 1e-5 / (1e-5 + eps)),
    ]:
        steps = []
        for name in ("adam_tf", "adam_pytorch"):
            p = torch.nn.Parameter(torch.zeros(1))
            opt = tp.make_optimizer([p], name, lr, eps)
            p.grad = torch.tensor([g])
            opt.step()
            steps.append(-p.item())
        assert steps[0] == pytest.approx(tf_expected, rel=1e-5)
        assert steps[1] == pytest.approx(pt_expected, rel=1e-5)
    # on a gradient of the size of epsilon the first TF-style step is ~16x smaller than PyTorch's
    assert steps[1] / steps[0] > 10


# queries: OAI's books format ------------------------------------------------------------------------------------------


def test_format_query_starts_after_the_first_dot_and_ends_at_the_last():
    dot, pad = 9, 0
    # after the first '.': [3, 4, 9, 5, 6, 9, 7]; 6 tokens: [3, 4, 9, 5, 6, 9]; already ends at a '.'
    assert tp.format_query([1, 2, 9, 3, 4, 9, 5, 6, 9, 7], dot, 6, pad) == [3, 4, 9, 5, 6, 9]
    assert tp.format_query([1, 2, 9, 3, 4, 9, 5, 6, 9, 7], dot, 5, pad) == [0, 0, 3, 4, 9]
    assert tp.format_query([1, 2, 9, 3, 4, 5, 6, 7, 8], dot, 4, pad) is None  # no '.' to end at
    assert tp.format_query([3, 4, 9], dot, 5, pad) == [0, 0, 3, 4, 9]  # the first '.' is the last token: keep all


def test_query_batches_are_identical_whatever_the_process():
    tok = AutoTokenizer.from_pretrained(NANO)
    texts = ["First one. The cat sat down. It purred.", "Nothing here", "Hello there. A day. Another day.",
             "Go. Run fast."] * 5
    a = next(tp.query_batches(texts, tok, 12, 4, 8, seed=3))[0]
    b = next(tp.query_batches(texts, tok, 12, 4, 8, seed=3))[0]
    assert torch.equal(a, b) and a.shape == (8, 12)
    assert (a[:, -1] == tok.convert_tokens_to_ids(".")).all()


# cost accounting -------------------------------------------------------------------------------------------------


def test_forward_flops_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    config = GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4, attn_implementation="eager")
    lm = GPT2LMHeadModel(config).eval()
    tokens = torch.randint(0, 512, (1, 48))
    for logit_positions in (48, 13):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            lm(input_ids=tokens, logits_to_keep=logit_positions)
        counted = counter.get_total_flops()  # every matmul, attention's included; biases and norms are not counted
        assert tp.forward_flops(lm, 48, logit_positions) == pytest.approx(counted, rel=0.02)
