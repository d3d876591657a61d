"""Write a tiny llama-architecture GGUF file for the test suite.

The real target is SmolLM2-135M-Instruct's GGUF: a llama-architecture model with tied embeddings
and a GPT-2-style byte-level BPE tokenizer. It is far too large (and too far away) for CI, so the
tests write a stand-in of the same shape themselves: a random-weight `LlamaForCausalLM` of a few
thousand parameters, stored in float32 (nothing is lost), with the project's nano tokenizer embedded
the way llama.cpp embeds one. transformers can then load both model and tokenizer from the file with
`from_pretrained(dir, gguf_file=name)`, exactly as it would load the real one.
"""

import json
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers


def _permute_for_gguf(weight: torch.Tensor, n_heads: int) -> np.ndarray:
    """llama.cpp's layout for q_proj / k_proj rows, which transformers' GGUF loader undoes.

    HF rotates the two halves of each head's dimensions against each other; llama.cpp rotates
    adjacent pairs. Within each head, rows [x0 .. x(d/2-1), y0 .. y(d/2-1)] become [x0, y0, x1, y1, ...].
    """
    rows, cols = weight.shape
    w = weight.detach().float().numpy().reshape(n_heads, 2, rows // n_heads // 2, cols)
    return w.swapaxes(1, 2).reshape(rows, cols)


def _tokenizer_vocab(tokenizer_dir: Path) -> tuple[list[str], list[int], list[str]]:
    """(tokens ordered by id, llama.cpp token types, merges as "a b") from a tokenizer.json."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    by_id = {i: tok for tok, i in spec["model"]["vocab"].items()}
    special = set()
    for added in spec["added_tokens"]:  # `<|endoftext|>`, `<|pad|>`: may sit outside the BPE vocab
        by_id[added["id"]] = added["content"]
        if added["special"]:
            special.add(added["id"])
    assert sorted(by_id) == list(range(len(by_id))), "token ids must be contiguous"
    tokens = [by_id[i] for i in range(len(by_id))]
    # CONTROL tokens are matched whole and never split; everything else is a NORMAL BPE token.
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    # Newer tokenizer.json files store each merge as a pair, older ones as one "a b" string.
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, types, merges


def write_tiny_gguf(path: Path, tokenizer_dir: Path, seed: int = 0, hidden_size: int = 32, layers: int = 2,
                    heads: int = 4, kv_heads: int = 2, intermediate: int = 64) -> "transformers.LlamaForCausalLM":
    """Write a random tiny llama (+ the tokenizer in `tokenizer_dir`, its pad token set to EOS as in SmolLM2's file) to
    `path`; return the HF model written."""
    path, tokenizer_dir = Path(path), Path(tokenizer_dir)
    tokens, token_types, merges = _tokenizer_vocab(tokenizer_dir)
    tok_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    token_id = {tok: i for i, tok in enumerate(tokens)}

    config = transformers.LlamaConfig(
        vocab_size=len(tokens), hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=256,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,  # tied, like SmolLM2-135M
        bos_token_id=token_id[tok_config["bos_token"]], eos_token_id=token_id[tok_config["eos_token"]],
        pad_token_id=token_id[tok_config["eos_token"]],
        # pad = eos, as in SmolLM2's file: the scripts add their own pad
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    head_dim = hidden_size // heads

    writer = gguf.GGUFWriter(path, arch="llama")
    # Model hyperparameters, under the `llama.*` keys transformers maps back onto a LlamaConfig.
    writer.add_name("tiny-random-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(len(tokens))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(hidden_size)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)

    # The tokenizer, as llama.cpp stores a GPT-2-style byte-level BPE: vocab, types, merges, special ids.
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # the plain GPT-2 pre-tokenizer regex, as tokenizer.json uses
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_unk_token_id(token_id[tok_config["unk_token"]])
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(False)  # the nano tokenizer adds no special tokens when encoding

    # Tensors, under llama.cpp's names. Tied embeddings: no `output.weight`, which tells the loader so.
    sd = model.state_dict()
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    for i in range(layers):
        hf = f"model.layers.{i}."
        tensors |= {
            f"blk.{i}.attn_norm.weight": sd[hf + "input_layernorm.weight"],
            f"blk.{i}.attn_q.weight": _permute_for_gguf(sd[hf + "self_attn.q_proj.weight"], heads),
            f"blk.{i}.attn_k.weight": _permute_for_gguf(sd[hf + "self_attn.k_proj.weight"], kv_heads),
            f"blk.{i}.attn_v.weight": sd[hf + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": sd[hf + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_norm.weight": sd[hf + "post_attention_layernorm.weight"],
            f"blk.{i}.ffn_gate.weight": sd[hf + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": sd[hf + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": sd[hf + "mlp.down_proj.weight"],
        }
    for name, tensor in tensors.items():
        # numpy's (out, in) order; GGUFWriter records the dims reversed, as ggml expects. F32 throughout.
        array = tensor if isinstance(tensor, np.ndarray) else tensor.detach().float().numpy()
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model
