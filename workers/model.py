"""Llama-family decoder in plain torch, reading Hugging Face weights.

Covers Llama 2/3, SmolLM2 and Mistral (no sliding window): RMSNorm, RoPE with
llama3 scaling, grouped-query attention, SiLU MLP, optionally tied embeddings.
Attention reads and writes a paged KV pool through an `AttnContext` built once
per step, so one forward serves prefill, chunked prefill and batched decode.
Tensor parallelism lives in the linear layers (`tp_size` / `tp_rank`); at
tp_size 1 they are plain linears.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelArgs:
        path = Path(path)
        c = json.loads((path / "config.json").read_text())
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        theta = c.get("rope_theta") or rope.get("rope_theta") or 10000.0
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        eos = c.get("eos_token_id")
        gen = path / "generation_config.json"
        if gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id", eos)
        eos_ids = tuple(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"],
            num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=dict(rope) if rope_type != "default" else None,
            max_position_embeddings=c.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            bos_token_id=c.get("bos_token_id"),
        )


@dataclass
class AttnContext:
    """Where one step's tokens live in the paged KV pool.

    The step's T new tokens are flattened over B sequences. Each new token's
    K/V is written at (write_blocks[t], write_offsets[t]); each sequence then
    attends over its first ctx_len cached positions, gathered through
    (gather_blocks, gather_offsets) [B, Lmax], under `mask` [B, 1, Tq, Lmax].
    `q_index` [B, Tq] maps padded query slots to flat token indices and
    `out_index` [T] maps flat tokens back into the padded [B*Tq] layout.
    """

    write_blocks: torch.Tensor
    write_offsets: torch.Tensor
    gather_blocks: torch.Tensor
    gather_offsets: torch.Tensor
    mask: torch.Tensor
    q_index: torch.Tensor
    out_index: torch.Tensor


def _tp_all_reduce(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    if tp_size > 1:
        dist.all_reduce(x)
    return x


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split across ranks; `shards` are the
    sizes of the logical matrices fused into this one (q, k, v or gate, up)."""

    def __init__(self, in_features: int, shards: list[int], tp_rank: int, tp_size: int):
        super().__init__()
        assert all(s % tp_size == 0 for s in shards), "output size must divide tp_size"
        self.shards = shards
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.weight = nn.Parameter(torch.empty(sum(shards) // tp_size, in_features),
                                   requires_grad=False)

    def load_shard(self, idx: int, full: torch.Tensor) -> None:
        per = self.shards[idx] // self.tp_size
        start = sum(self.shards[:idx]) // self.tp_size
        self.weight[start:start + per].copy_(full.narrow(0, self.tp_rank * per, per))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split across ranks, then all-reduced."""

    def __init__(self, in_features: int, out_features: int, tp_rank: int, tp_size: int):
        super().__init__()
        assert in_features % tp_size == 0
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp_size),
                                   requires_grad=False)

    def load(self, full: torch.Tensor) -> None:
        per = self.weight.shape[1]
        self.weight.copy_(full.narrow(1, self.tp_rank * per, per))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _tp_all_reduce(F.linear(x, self.weight), self.tp_size)


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split across ranks; also serves as the
    (tied or untied) LM head, whose shards are gathered on every rank."""

    def __init__(self, vocab_size: int, dim: int, tp_rank: int, tp_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.per = math.ceil(vocab_size / tp_size)
        self.start = tp_rank * self.per
        self.tp_size = tp_size
        self.weight = nn.Parameter(torch.zeros(self.per, dim), requires_grad=False)

    def load(self, full: torch.Tensor) -> None:
        part = full[self.start:self.start + self.per]
        self.weight[: part.shape[0]].copy_(part)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.per)
        out = F.embedding(local.clamp(0, self.per - 1), self.weight) * inside.unsqueeze(-1)
        return _tp_all_reduce(out, self.tp_size)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = F.linear(h, self.weight)
        if self.tp_size > 1:
            parts = [torch.empty_like(out) for _ in range(self.tp_size)]
            dist.all_gather(parts, out)
            out = torch.cat(parts, dim=-1)
        return out[..., : self.vocab_size]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same op order as Hugging Face, so float32 results match bit for bit.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    dim = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = args.rope_scaling
    if not s:
        return inv
    kind = s.get("rope_type") or s.get("type")
    if kind == "linear":
        return inv / s["factor"]
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling type: {kind!r}")
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    lo_wavelen, hi_wavelen = old_len / lo, old_len / hi
    wavelen = 2 * math.pi / inv
    inv_l = torch.where(wavelen > lo_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    medium = ~(wavelen < hi_wavelen) * ~(wavelen > lo_wavelen)
    return torch.where(medium, smoothed, inv_l)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, tp_rank: int, tp_size: int):
        super().__init__()
        assert args.num_heads % tp_size == 0 and args.num_kv_heads % tp_size == 0, (
            "tensor_parallel_size must divide the number of heads and KV heads")
        self.layer = layer
        self.nh = args.num_heads // tp_size
        self.nkv = args.num_kv_heads // tp_size
        self.hd = args.head_dim
        q, kv = args.num_heads * self.hd, args.num_kv_heads * self.hd
        self.qkv_proj = ColumnParallelLinear(args.hidden_size, [q, kv, kv], tp_rank, tp_size)
        self.o_proj = RowParallelLinear(q, args.hidden_size, tp_rank, tp_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_pool: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q = q.view(T, self.nh, self.hd)
        k = k.view(T, self.nkv, self.hd)
        v = v.view(T, self.nkv, self.hd)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        # Pool layout is block-major [blocks, layers, 2, block_size, kv_heads, head_dim]
        # so one block of one request is one contiguous region for transfers.
        k_cache, v_cache = kv_pool[:, self.layer, 0], kv_pool[:, self.layer, 1]
        k_cache.index_put_((ctx.write_blocks, ctx.write_offsets), k)
        v_cache.index_put_((ctx.write_blocks, ctx.write_offsets), v)
        keys = k_cache[ctx.gather_blocks, ctx.gather_offsets].transpose(1, 2)    # B,H,L,D
        values = v_cache[ctx.gather_blocks, ctx.gather_offsets].transpose(1, 2)
        queries = q[ctx.q_index].transpose(1, 2)                                   # B,H,Tq,D
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=ctx.mask,
                                             enable_gqa=self.nkv != self.nh)
        B, _, Tq, _ = out.shape
        out = out.transpose(1, 2).reshape(B * Tq, self.nh * self.hd)[ctx.out_index]
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, tp_rank: int, tp_size: int):
        super().__init__()
        i = args.intermediate_size
        self.i_local = i // tp_size
        self.gate_up_proj = ColumnParallelLinear(args.hidden_size, [i, i], tp_rank, tp_size)
        self.down_proj = RowParallelLinear(i, args.hidden_size, tp_rank, tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.i_local, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, tp_rank: int, tp_size: int):
        super().__init__()
        self.self_attn = Attention(args, layer, tp_rank, tp_size)
        self.mlp = MLP(args, tp_rank, tp_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, kv_pool, ctx):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_pool, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack plus LM head; `forward` returns hidden states of the
    step's tokens, `logits` turns selected hidden states into vocab logits."""

    def __init__(self, args: ModelArgs, max_len: int, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.args = args
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.embed_tokens = VocabParallelEmbedding(args.vocab_size, args.hidden_size,
                                                   tp_rank, tp_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i, tp_rank, tp_size)
                                    for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = (self.embed_tokens if args.tie_word_embeddings else
                        VocabParallelEmbedding(args.vocab_size, args.hidden_size,
                                               tp_rank, tp_size))
        freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * rope_inv_freq(args)[None]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    @property
    def kv_heads_local(self) -> int:
        return self.args.num_kv_heads // self.tp_size

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_pool: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.cos[positions], self.sin[positions]
        for layer in self.layers:
            x = layer(x, cos, sin, kv_pool, ctx)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden)

    def load_hf_weights(self, path: str | Path) -> None:
        """Read a Hugging Face safetensors checkpoint into this rank's shards."""
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {path}")
        seen = set()
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    self._load_one(name, st.get_tensor(name))
                    seen.add(name)
        if "lm_head.weight" not in seen and not self.args.tie_word_embeddings:
            raise ValueError(f"{path}: lm_head.weight missing and embeddings are not tied")

    _FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    @torch.no_grad()
    def _load_one(self, name: str, t: torch.Tensor) -> None:
        dtype = self.norm.weight.dtype
        t = t.to(dtype)
        if name.startswith("model."):
            name = name[len("model."):]
        if name in ("embed_tokens.weight", "lm_head.weight"):
            if name == "lm_head.weight" and self.args.tie_word_embeddings:
                return
            getattr(self, name.split(".")[0]).load(t)
            return
        if name == "norm.weight":
            self.norm.weight.copy_(t)
            return
        parts = name.split(".")  # layers.{i}.{self_attn|mlp|*_layernorm}.{proj}.weight
        if parts[0] != "layers":
            if "rotary_emb" in name:
                return
            raise ValueError(f"unexpected weight {name}")
        layer = self.layers[int(parts[1])]
        if parts[2].endswith("layernorm"):
            getattr(layer, parts[2]).weight.copy_(t)
            return
        block = getattr(layer, parts[2])
        proj = parts[3]
        if proj in self._FUSED:
            fused, idx = self._FUSED[proj]
            getattr(block, fused).load_shard(idx, t)
        elif proj in ("o_proj", "down_proj"):
            getattr(block, proj).load(t)
        else:
            raise ValueError(f"unexpected weight {name}")
