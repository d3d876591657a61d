"""Faster, computing the same function: each speed change of train_policy.py against the path it replaced.

bf16 on every forward, the static-cache sampler compiled, reference and reward forwards in chunks, the foreach
TF-style Adam, the compiled training forward (docs/ppo.md, "The same function, computed faster").
"""

import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import train_policy as tp


@pytest.fixture(scope="module")
def tiny(tiny_models):
    """The session's 1-layer GPT-2 on the nano tokenizer (base model folder and a reward model made from it), loaded."""
    lm, tokenizer = tp.prepare_lm(*tp.load_base_model(str(tiny_models / "base")))
    return tiny_models, lm.eval(), tokenizer


TINY_POLICY = ["--total_episodes", "16", "--batch_size", "16", "--nminibatches", "2", "--local_micro_batch_size", "4",
               "--noptepochs", "2", "--query_length", "16", "--response_length", "6", "--print_sample_every", "100",
               "--local_rollout_forward_batch_size", "4"]

WATCHED = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_log_softmax", "maximum", "_foreach_addcdiv_"}


class RecordDtypes(TorchDispatchMode):
    """For every matmul (and attention), log-softmax, max (the clipped losses) and Adam's parameter update, the dtypes
    of the floating-point tensors it is given. Autocast sits above the dispatch mode, so what is recorded is what the
    kernels compute in."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in WATCHED or ("scaled_dot_product" in name and not name.endswith("_backward")):  # (its fp32 logsumexp)
            flat = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])]
            dtypes = {str(t.dtype) for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()}
            self.seen.setdefault(name, set()).update(dtypes)
        return func(*args, **(kwargs or {}))


@pytest.mark.slow
def test_bf16_every_forward_multiplies_in_bf16_and_keeps_softmax_losses_and_adam_in_fp32(tiny, tmp_path, main):
    folder, _, _ = tiny
    seen = {}
    for precision in ("no", "bf16"):  # one PPO update of train_policy.py, recorded
        with RecordDtypes() as record:
            r = main(tp, "--base_model", folder / "base", "--reward_model", folder / "reward_model", *TINY_POLICY,
                     "--run_root", tmp_path / precision, "--mixed_precision", precision)
        assert r.returncode == 0, r.stderr[-3000:]
        seen[precision] = {k: sorted(v) for k, v in record.seen.items()}
    matmuls = [k for k in seen["bf16"] if k not in ("_log_softmax", "maximum", "_foreach_addcdiv_")]
    assert {"addmm", "_foreach_addcdiv_", "_log_softmax"} <= set(seen["bf16"]) and matmuls
    # sampling, value, reference, reward and training forward: every matmul and attention call multiplies in bf16 ...
    for name in matmuls:
        assert seen["bf16"][name] == ["torch.bfloat16"], (name, seen["bf16"][name])
        assert seen["no"][name] == ["torch.float32"], (name, seen["no"][name])
    # ... while log-probs, the clipped losses and Adam's update of the fp32 weights stay fp32
    for name in ("_log_softmax", "maximum", "_foreach_addcdiv_"):
        assert seen["bf16"][name] == ["torch.float32"], (name, seen["bf16"][name])


# The three tests of --compile run in this order on one xdist worker (a file is one worker's). The first two compile, at
# the shapes of the third's run (16 queries of 16 tokens, 6 response tokens; micro-batches of 4), what the third's run
# compiles, which then finds every kernel in torch.compile's caches: each test pays for part of the compilation.
def compiled_inputs(lm, tokenizer) -> tuple:
    """The policy (its value head random, so that values are compared too), 16 left-padded queries and their sampled
    responses."""
    pad = tokenizer.pad_token_id
    ids = tokenizer.encode("It was a cold morning.")
    queries = torch.tensor([[pad] * (16 - len(ids)) + ids] * 16)  # (16, 16)
    policy = tp.PolicyAndValue(lm).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(policy.value_head.weight)
    return policy, queries


@pytest.mark.slow
def test_compiled_sampler_computes_what_the_eager_one_does(tiny):
    _, lm, tokenizer = tiny
    pad = tokenizer.pad_token_id
    policy, queries = compiled_inputs(lm, tokenizer)
    tokens, logprobs, entropies, values = tp.Sampler(lm, pad, 0.7, compile=True)(queries, 6, policy.value_head)
    with torch.no_grad():
        full_logits, full_values = policy(torch.cat([queries, tokens], 1), pad, 6)
    full_logprobs, full_entropies = tp.response_logprobs(full_logits, tokens, 0.7, pad)
    for got, want in [(logprobs, full_logprobs), (entropies, full_entropies), (values, full_values)]:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_compiled_training_forward_and_its_gradients_equal_the_eager_ones(tiny):
    _, lm, tokenizer = tiny
    pad = tokenizer.pad_token_id
    policy, queries = compiled_inputs(lm, tokenizer)
    tokens = torch.randint(2, len(tokenizer), (4, 6))
    inputs = torch.cat([queries[:4], tokens], 1)  # (4, 22): a micro-batch of the run below
    policy.train()  # as the run compiles it
    compiled = torch.compile(policy)
    grads = []
    for forward in (policy, compiled):
        policy.zero_grad()
        logits, v = forward(inputs, pad, 6)
        (tp.response_logprobs(logits, tokens, 0.7, pad)[0].sum() + v.sum()).backward()
        grads.append([p.grad.clone() for p in policy.parameters()])
    for eager, comp in zip(*grads):
        torch.testing.assert_close(comp, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_train_policy_with_compile_runs_and_starts_at_the_reference(tiny, tmp_path, main):
    folder, _, _ = tiny
    r = main(tp, "--base_model", folder / "base", "--reward_model", folder / "reward_model", *TINY_POLICY, "--compile",
             "--run_root", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    (first,) = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    # the compiled sampler's log-probs equal the eager reference's before any update
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-4)
    assert all(math.isfinite(v) for v in first.values())


def test_reference_and_reward_forwards_in_chunks_equal_one_forward(tiny):
    _, lm, tokenizer = tiny
    pad = tokenizer.pad_token_id
    torch.manual_seed(1)
    tokens = torch.randint(2, len(tokenizer), (10, 12))
    tokens[:3, :4] = pad  # left-padded rows
    reward_model = tp.RewardModel(lm).eval()
    with torch.no_grad():
        whole = tp.response_logprobs(tp.response_logits(lm, tokens, pad, 5), tokens[:, -5:], 0.7, pad)[0]
        for size in (1, 3, 10, 64):
            chunked = tp.in_chunks(lambda t, r: tp.response_logprobs(tp.response_logits(lm, t, pad, 5), r, 0.7, pad)[0],
                                   size, tokens, tokens[:, -5:])
            torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(tp.in_chunks(lambda t: reward_model(t, pad), size, tokens),
                                       reward_model(tokens, pad), atol=1e-5, rtol=1e-5)


def adam_tf_per_parameter_loop(params, grads_per_step, lr, eps, betas=(0.9, 0.999)):
    """The TF-style Adam as train_policy.py computed it before the foreach version: one parameter at a time."""
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, 1):
        for p, g, m_, v_ in zip(params, grads, m, v):
            m_.mul_(betas[0]).add_(g, alpha=1 - betas[0])
            v_.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
            lr_t = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
            p.addcdiv_(m_, v_.sqrt().add_(eps), value=-lr_t)
    return params


def test_foreach_tf_adam_equals_the_per_parameter_loop():
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 2, 4), ()]
    start = [torch.randn(s) for s in shapes]
    grads_per_step = [[torch.randn(s) * 10 ** torch.randint(-6, 1, ()).item() for s in shapes] for _ in range(5)]
    expected = adam_tf_per_parameter_loop([p.clone() for p in start], grads_per_step, lr=1e-3, eps=1e-5)
    params = [torch.nn.Parameter(p.clone()) for p in start]
    opt = tp.make_optimizer(params, "adam_tf", 1e-3, 1e-5)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    for got, want in zip(params, expected):
        torch.testing.assert_close(got.detach(), want, atol=1e-7, rtol=1e-6)
    assert all(opt.state[p]["step"] == 5 and opt.state[p]["m"].dtype == torch.float32 for p in params)
