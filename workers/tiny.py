"""Deterministic tiny random-weight Llama checkpoints for tests and configs.

`write_tiny_llama` writes an ordinary Hugging Face directory (config.json,
model.safetensors in float32, generation_config.json, tokenizer.json,
tokenizer_config.json, chat_template.jinja) that needs nothing from a model
hub. The same arguments always give byte-identical files.

Tokenizer: byte-level BPE whose ids 0..255 are the 256 bytes (GPT-2 byte to
unicode mapping), a handful of fixed merges, then the specials
<|bos|> <|eos|> <|pad|> <|im_start|> <|im_end|>, then <|reserved_N|> specials
up to the model's vocab_size (tokenizer size rounded up to a multiple of 64),
so every id the model can emit decodes to something. Any UTF-8 text
round-trips; a multi-byte character spans several tokens. No BOS is added
automatically. The chat template is ChatML style; both <|eos|> and <|im_end|>
are end-of-sequence ids in generation_config.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from wire.host import cache_dir

os.environ["HF_HUB_OFFLINE"] = "1"

MARKER = "pdcluster_tiny.json"
# Bump when the generator changes in a way that changes the files it writes.
FORMAT_VERSION = 1

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
MERGES = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("e", "r"),
    ("a", "n"),
    ("Ġ", "a"),
    ("o", "n"),
    ("r", "e"),
    ("Ġ", "s"),
]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def build_tokenizer():
    """The tiny byte-level tokenizer as a transformers PreTrainedTokenizerFast."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(
        models.BPE(
            vocab=vocab, merges=list(MERGES), unk_token=None, fuse_unk=False, byte_fallback=False
        )
    )
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    n_base = len(vocab) + len(SPECIALS)
    reserved = [f"<|reserved_{i}|>" for i in range(_round_up(n_base, 64) - n_base)]
    tk.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIALS + reserved]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
    )
    assert len(tok) % 64 == 0
    return tok


def _args(**kw) -> dict:
    return {"format": FORMAT_VERSION, **kw}


def _complete(path: Path, args: dict) -> bool:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        marker == args
        and (path / "config.json").is_file()
        and (path / "model.safetensors").is_file()
    )


def write_tiny_llama(
    path: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    rope_scaling: dict | None = None,
    tie_word_embeddings: bool = True,
    rope_theta: float = 10000.0,
    initializer_range: float = 0.5,
) -> Path:
    """Write (once) a deterministic random-weight LlamaForCausalLM + tokenizer at `path`.

    initializer_range is large on purpose: with the default 0.02 and tied
    embeddings, greedy decoding just repeats the last token forever.
    """
    path = Path(path)
    args = _args(
        seed=seed,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        rope_scaling=dict(rope_scaling) if rope_scaling else None,
        tie_word_embeddings=tie_word_embeddings,
        rope_theta=float(rope_theta),
        initializer_range=float(initializer_range),
    )
    if _complete(path, args):
        return path
    if path.exists() and any(path.iterdir()) and not (path / MARKER).exists():
        raise FileExistsError(f"{path} exists and is not a tiny model written by pdcluster")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads, num_heads by num_kv_heads")

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    rope = dict(rope_scaling) if rope_scaling else {"rope_type": "default"}
    rope["rope_theta"] = float(rope_theta)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_parameters=rope,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        bos_token_id=ids["<|bos|>"],
        eos_token_id=ids["<|eos|>"],
        pad_token_id=ids["<|pad|>"],
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|bos|>"],
        eos_token_id=[ids["<|eos|>"], ids["<|im_end|>"]],
        pad_token_id=ids["<|pad|>"],
    )

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(args, sort_keys=True, indent=1) + "\n")
        _publish(tmp, path, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _publish(tmp: Path, path: Path, args: dict) -> None:
    """Atomically move a finished temp dir into place (losing a race is fine)."""
    for f in tmp.iterdir():
        f.chmod(0o644)
    tmp.chmod(0o755)
    if path.exists() and not _complete(path, args):
        # Ours, but stale or incomplete: move it aside, then drop it.
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, path)
    except OSError:
        if not _complete(path, args):  # someone else won only if they finished
            raise


def tiny_args_hash(**overrides) -> str:
    import inspect

    sig = inspect.signature(write_tiny_llama)
    kw = {k: p.default for k, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}
    unknown = set(overrides) - set(kw)
    if unknown:
        raise TypeError(f"unknown tiny model args: {sorted(unknown)}")
    kw.update(overrides)
    blob = json.dumps(_args(**kw), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def tiny_model_dir(cache: Path | None = None, **overrides) -> Path:
    """`<cache>/models/tiny-llama-<hash of args>`, written on first use."""
    root = Path(cache) if cache is not None else cache_dir()
    path = root / "models" / f"tiny-llama-{tiny_args_hash(**overrides)}"
    return write_tiny_llama(path, **overrides)
