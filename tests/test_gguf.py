"""A .gguf base model (the format SmolLM2-135M-Instruct ships in) trains in every script, and what the scripts save is
a plain Hugging Face folder (de-quantized weights, no quantization marker) that every script loads back."""

import json

import pytest
import torch
from conftest import NANO
from gguf_writer import write_tiny_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

import train_both
import train_policy as tp
import train_reward as tr
import train_sft

TINY_BOTH = [
    "--reward.num_train", "16", "--reward.num_test", "8", "--reward.batch_size", "8",
    "--reward.local_micro_batch_size", "4", "--reward.normalize_samples", "16", "--reward.rollout_batch_size", "16",
    "--reward.eval_every", "1", "--policy.total_episodes", "16", "--policy.batch_size", "16", "--policy.nminibatches",
    "1", "--policy.local_micro_batch_size", "8", "--policy.noptepochs", "1", "--policy.print_sample_every", "100",
]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A random 2-layer llama with the nano tokenizer (pad = EOS, as in SmolLM2's file), written as F32 GGUF."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_tiny_gguf(path, NANO)


def assert_plain_folder(folder):
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama", folder
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert getattr(model, "hf_quantizer", None) is None
    return model


def test_load_base_model_reads_a_gguf_as_an_ordinary_trainable_model(tiny_gguf, tmp_path):
    path, written = tiny_gguf
    model, tokenizer = tp.load_base_model(str(path))
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    ids = torch.tensor([AutoTokenizer.from_pretrained(NANO).encode("The rain stopped. She smiled at the old dog.")])
    assert tokenizer.encode("The rain stopped. She smiled at the old dog.") == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, written(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "saved")  # raised "quantized with gguf and is not serializable" before
    reloaded = assert_plain_folder(tmp_path / "saved")
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    # every script carries the same loader
    assert tr.load_base_model.__code__.co_code == tp.load_base_model.__code__.co_code


@pytest.mark.slow
def test_every_script_trains_a_gguf_base_and_saves_a_folder_every_script_loads(tiny_gguf, small_corpus, tmp_path, main):
    path, _ = tiny_gguf
    # SFT from the .gguf: one update, saved to a folder
    sft = tmp_path / "sft_model"
    r = main(train_sft, "--base_model", path, "--dataset", small_corpus, "--total_steps", "1", "--batch_size", "4",
             "--local_micro_batch_size", "4", "--block_size", "32", "--num_samples", "1", "--sample_length", "4",
             "--output_dir", sft, "--run_root", tmp_path / "runs_sft")
    assert r.returncode == 0, r.stderr[-3000:]
    model = assert_plain_folder(sft)
    assert AutoTokenizer.from_pretrained(sft).pad_token not in (None, "<|endoftext|>")  # the dedicated pad token, saved
    # reward model and PPO from the .gguf itself, then from the folder SFT wrote
    for base in (str(path), str(sft)):
        root = tmp_path / f"runs_{len(base)}"
        r = main(train_both, *TINY_BOTH, "--reward.base_model", base, "--policy.base_model", base, "--run_root", root)
        assert r.returncode == 0, r.stderr[-3000:]
        (run_dir,) = root.iterdir()
        assert_plain_folder(run_dir / "reward" / "reward_model")
        policy = assert_plain_folder(run_dir / "policy" / "policy")
        assert policy.config.num_hidden_layers == model.config.num_hidden_layers == 2
        reward_model, _ = tp.load_reward_model(str(run_dir / "reward" / "reward_model"))
        assert isinstance(reward_model, tp.RewardModel)
