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

from workers import gemm


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

    The pool [blocks, layers, 2, kv_heads, block_size, head_dim] is seen two
    ways: `rows` [-1, head_dim], one token's K or V of one head of one layer,
    and `chunks` [-1, block_size * head_dim], one block's K or V of one head of
    one layer. The step's T new tokens are flattened over B sequences; per
    layer, `write_rows[layer]` [T, 2, kv_heads] names the K and V rows each new
    token writes, and `gather_chunks[layer]` [B * 2 * kv_heads * L / block_size]
    the chunks of each sequence's first `L / block_size` blocks (padded with any
    valid block), ordered so that the gathered copy is K [B, kv_heads, L, hd]
    then V, the layout attention reads. The copy goes into `gather_out`, one
    buffer reused by every layer and step (a fresh multi-MB tensor per layer
    costs page faults: at 13 sequences of 608 tokens it made the gather and
    attention 2-3x slower). Keys are read under the additive `mask` [B, 1, Tq, L]
    (0 or -inf), which also hides the padding. When every sequence has the
    same number of new tokens (decode, or equal prompts) the flat tokens are
    already a [B, Tq] grid and the two index maps are None; otherwise `q_index`
    [B, Tq] maps padded query slots to flat token indices and `out_index` [T]
    maps flat tokens back into the padded [B*Tq] layout.
    """

    rows: torch.Tensor
    chunks: torch.Tensor
    write_rows: list[torch.Tensor]
    gather_chunks: list[torch.Tensor]
    gather_out: torch.Tensor
    mask: torch.Tensor
    q_index: torch.Tensor | None = None
    out_index: torch.Tensor | None = None


def _tp_all_reduce(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    if tp_size > 1:
        dist.all_reduce(x)
    return x


class _PackedLinear(nn.Module):
    """A linear layer whose GEMM path is chosen per row bucket by measuring on this
    CPU (workers/gemm.py): `F.linear`, MKL's packed layout or oneDNN's. A path other
    than `F.linear` keeps a second copy of the weight in its layout."""

    weight: nn.Parameter
    route: tuple[str, str, str] = ("linear", "linear", "linear")
    prepared: dict | None = None

    def set_route(self, route) -> None:
        """Use `route` (a path per row bucket); a path this torch cannot prepare for this
        weight (a plan cached for another build) falls back to `F.linear`."""
        w = self.weight.detach()
        self.prepared = {}
        for p in set(route) - {"linear"}:
            try:
                self.prepared[p] = gemm.prepare(p, w)
            except Exception as e:  # noqa: BLE001
                gemm.log.warning("GEMM path %s unavailable for %s: %r", p, gemm.shape_key(w), e)
                route = ["linear" if r == p else r for r in route]
        self.route = tuple(route)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        path = self.route[gemm.bucket(x.numel() // x.shape[-1])]
        if path == "linear":
            return F.linear(x, self.weight)
        return gemm.run(path, x, self.weight, self.prepared[path])


class ColumnParallelLinear(_PackedLinear):
    """y = x W^T with W's output rows split across ranks; `shards` are the
    sizes of the logical matrices fused into this one (q, k, v or gate, up)."""

    def __init__(self, in_features: int, shards: list[int], tp_rank: int, tp_size: int):
        super().__init__()
        assert all(s % tp_size == 0 for s in shards), "output size must divide tp_size"
        self.shards = shards
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.weight = nn.Parameter(
            torch.empty(sum(shards) // tp_size, in_features), requires_grad=False
        )

    def load_shard(self, idx: int, full: torch.Tensor) -> None:
        per = self.shards[idx] // self.tp_size
        start = sum(self.shards[:idx]) // self.tp_size
        self.weight[start : start + per].copy_(full.narrow(0, self.tp_rank * per, per))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


class RowParallelLinear(_PackedLinear):
    """y = x W^T with W's input columns split across ranks, then all-reduced."""

    def __init__(self, in_features: int, out_features: int, tp_rank: int, tp_size: int):
        super().__init__()
        assert in_features % tp_size == 0
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features // tp_size), requires_grad=False
        )

    def load(self, full: torch.Tensor) -> None:
        per = self.weight.shape[1]
        self.weight.copy_(full.narrow(1, self.tp_rank * per, per))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _tp_all_reduce(self.matmul(x), self.tp_size)


class VocabParallelEmbedding(_PackedLinear):
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
        part = full[self.start : self.start + self.per]
        self.weight[: part.shape[0]].copy_(part)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.per)
        out = F.embedding(local.clamp(0, self.per - 1), self.weight) * inside.unsqueeze(-1)
        return _tp_all_reduce(out, self.tp_size)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = self.matmul(h)
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
        if x.dtype == torch.float32:
            # Hugging Face's ops in its order (bit for bit), in place where it can be:
            # fewer kernels than F.rms_norm, which copies its input twice on CPU.
            r = x.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
            return (x * r).mul_(self.weight)
        # Same op order as Hugging Face, so results match bit for bit.
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


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, tp_rank: int, tp_size: int):
        super().__init__()
        assert args.num_heads % tp_size == 0 and args.num_kv_heads % tp_size == 0, (
            "tensor_parallel_size must divide the number of heads and KV heads"
        )
        self.layer = layer
        self.nh = args.num_heads // tp_size
        self.nkv = args.num_kv_heads // tp_size
        self.hd = args.head_dim
        q, kv = args.num_heads * self.hd, args.num_kv_heads * self.hd
        self.qkv_proj = ColumnParallelLinear(args.hidden_size, [q, kv, kv], tp_rank, tp_size)
        self.o_proj = RowParallelLinear(q, args.hidden_size, tp_rank, tp_size)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttnContext
    ) -> torch.Tensor:
        T, nh, nkv, hd = x.shape[0], self.nh, self.nkv, self.hd
        qkv = self.qkv_proj(x).view(T, nh + 2 * nkv, hd)
        # RoPE over q, k and v heads in one pass: `cos`/`sin` are 1/0 on the v heads,
        # which leaves v exact; `sin` carries rotate_half's sign, so the result is
        # bit for bit Hugging Face's q * cos + rotate_half(q) * sin.
        half = hd // 2
        qkv = qkv * cos + torch.cat((qkv[..., half:], qkv[..., :half]), dim=-1) * sin
        ctx.rows.index_put_((ctx.write_rows[self.layer],), qkv[:, nh:].view(T, 2, nkv, hd))
        B, _, Tq, L = ctx.mask.shape
        # Whole blocks are gathered, K and V in one copy; the mask hides what is not context.
        idx = ctx.gather_chunks[self.layer]
        out = ctx.gather_out[: idx.numel() * ctx.chunks.shape[1]].view(idx.numel(), -1)
        kv = torch.index_select(ctx.chunks, 0, idx, out=out).view(B, 2, nkv, L, hd)
        q, keys, values = qkv[:, :nh], kv[:, 0], kv[:, 1]
        if Tq == 1:
            # Decode: the nh / nkv query heads that share a KV head are that head's query
            # rows (GQA exactly; at batch 32 a third faster than enable_gqa).
            out = F.scaled_dot_product_attention(
                q.view(B, nkv, nh // nkv, hd), keys, values, attn_mask=ctx.mask
            ).view(B, nh * hd)
        else:
            queries = q.view(B, Tq, nh, hd) if ctx.q_index is None else q[ctx.q_index]
            out = F.scaled_dot_product_attention(
                queries.transpose(1, 2), keys, values, attn_mask=ctx.mask, enable_gqa=nkv != nh
            )
            out = out.transpose(1, 2).reshape(B * Tq, nh * hd)
        if ctx.out_index is not None:
            out = out[ctx.out_index]
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
        return self.down_proj(F.silu(gate).mul_(up))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, tp_rank: int, tp_size: int):
        super().__init__()
        self.self_attn = Attention(args, layer, tp_rank, tp_size)
        self.mlp = MLP(args, tp_rank, tp_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, ctx):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack plus LM head; `forward` returns hidden states of the
    step's tokens, `logits` turns selected hidden states into vocab logits."""

    def __init__(self, args: ModelArgs, max_len: int, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.args = args
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.embed_tokens = VocabParallelEmbedding(
            args.vocab_size, args.hidden_size, tp_rank, tp_size
        )
        self.layers = nn.ModuleList(
            DecoderLayer(args, i, tp_rank, tp_size) for i in range(args.num_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = (
            self.embed_tokens
            if args.tie_word_embeddings
            else VocabParallelEmbedding(args.vocab_size, args.hidden_size, tp_rank, tp_size)
        )
        self.nh, self.nkv = args.num_heads // tp_size, args.num_kv_heads // tp_size
        freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * rope_inv_freq(args)[None]
        half = freqs.shape[1]
        emb = torch.cat((freqs, freqs), dim=-1)
        # sin with rotate_half's sign folded in:
        # rotate_half(x) * sin == swap_halves(x) * sin_signed.
        sin = emb.sin()
        sin[:, :half] = -sin[:, :half]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin_signed", sin, persistent=False)

    @property
    def kv_heads_local(self) -> int:
        return self.args.num_kv_heads // self.tp_size

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttnContext
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self._rope(positions)
        for layer in self.layers:
            x = layer(x, cos, sin, ctx)
        return self.norm(x)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's cos/sin over [T, q + k + v heads, head_dim], built once for
        every layer: RoPE on the q and k heads, identity (1, 0) on the v heads."""
        T, hd, nqk = positions.shape[0], self.args.head_dim, self.nh + self.nkv
        cos = self.cos.index_select(0, positions).unsqueeze(1)
        sin = self.sin_signed.index_select(0, positions).unsqueeze(1)
        one = cos.new_ones(()).expand(T, self.nkv, hd)
        cos = torch.cat((cos.expand(T, nqk, hd), one), dim=1)
        sin = torch.cat((sin.expand(T, nqk, hd), torch.zeros_like(one)), dim=1)
        return cos, sin

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden)

    def linears(self) -> list[_PackedLinear]:
        """Every layer that multiplies (an untied input embedding only looks up rows)."""
        return [
            m
            for m in self.modules()
            if isinstance(m, _PackedLinear)
            and (not isinstance(m, VocabParallelEmbedding) or m is self.lm_head)
        ]

    def choose_gemm(self, cache_file) -> dict[str, list[str]]:
        """Measure (or read from `cache_file`) the fastest GEMM path per weight shape
        and row bucket on this CPU, and set every linear layer's route."""
        layers = self.linears()
        plan = gemm.choose([m.weight.detach() for m in layers], cache_file)
        for m in layers:
            m.set_route(plan[gemm.shape_key(m.weight)])
        return plan

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

    _FUSED = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    @torch.no_grad()
    def _load_one(self, name: str, t: torch.Tensor) -> None:
        dtype = self.norm.weight.dtype
        t = t.to(dtype)
        if name.startswith("model."):
            name = name[len("model.") :]
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
