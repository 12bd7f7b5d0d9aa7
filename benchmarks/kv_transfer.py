"""KV handoff between two Ray nodes, three ways side by side in one run.

For prompts of 128, 512 and 2048 tokens of SmolLM2-135M-sized KV (30 layers,
3 KV heads, head_dim 64, float32, 16-token blocks: 720 KiB a block), a decode
actor copies the prompt's blocks out of a prefill actor's pool:

  transfer/      NixlTransferAgent.pull (what the decode worker calls)
  transfer+claim the same plus the lease claim round trip to prefill (the full worker path)
  raw NIXL       one READ built directly with the nixl API over the same bytes
  Ray store      prefill ray.put()s a copy of the blocks, decode ray.get()s and copies them in

Usage:  .venv/bin/python benchmarks/kv_transfer.py [--reps 7]
Writes benchmarks/results/kv_transfer.json and prints a table of GB/s and ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import ray
import torch
from ray.cluster_utils import Cluster

from wire.host import cpu_model

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 30, 3, 64, 16
POOL_BLOCKS = 300
PROMPTS = (128, 512, 2048)


def pool() -> torch.Tensor:
    return torch.empty(POOL_BLOCKS, LAYERS, 2, BLOCK, KV_HEADS, HEAD_DIM)


@ray.remote(num_cpus=0, resources={"prefill_node": 0.01})
class Prefill:
    def __init__(self):
        from transfer import LeaseRegistry
        from transfer.nixl_backend import NixlTransferAgent

        torch.set_num_threads(1)
        self.pool = pool().normal_()
        self.agent = NixlTransferAgent("bench-prefill", self.pool)
        self.leases = LeaseRegistry(1024, 60, 60)

    def describe(self, ids: list[int], rid: str):
        lease = self.leases.register(rid, ids)
        return self.agent.rank_kv(ids), lease.epoch

    def claim(self, rid: str, epoch: int) -> list[int]:
        blocks = self.leases.claim(rid, epoch)
        self.leases.release(rid, epoch)
        return blocks

    def put(self, ids: list[int]):
        return [ray.put(self.pool.index_select(0, torch.tensor(ids)))]

    def checksum(self, ids: list[int]) -> float:
        return float(self.pool[ids].double().sum())


@ray.remote(num_cpus=0, resources={"decode_node": 0.01})
class Decode:
    def __init__(self):
        from transfer.nixl_backend import NixlTransferAgent

        torch.set_num_threads(1)
        self.pool = pool().zero_()
        self.agent = NixlTransferAgent("bench-decode", self.pool)

    def transfer_pull(self, src, local: list[int]) -> float:
        t = time.perf_counter()
        self.agent.pull(src, local, timeout_s=30)
        return time.perf_counter() - t

    def transfer_claim_pull(self, prefill, rid: str, epoch: int, src, local: list[int]) -> float:
        t = time.perf_counter()
        assert ray.get(prefill.claim.remote(rid, epoch)) == src.block_ids
        self.agent.pull(src, local, timeout_s=30)
        return time.perf_counter() - t

    def raw_nixl(self, src, local: list[int]) -> float:
        """One READ over the same bytes, straight through the nixl API (handshake done)."""
        import numpy as np

        agent = self.agent._agent
        bb = src.block_bytes

        def descs(base, ids):
            d = np.empty((len(ids), 3), dtype=np.uint64)
            d[:, 0] = base + np.asarray(ids, dtype=np.uint64) * np.uint64(bb)
            d[:, 1], d[:, 2] = bb, 0
            return agent.get_xfer_descs(d, "DRAM")

        t = time.perf_counter()
        xfer = agent.initialize_xfer(
            "READ",
            descs(self.pool.data_ptr(), local),
            descs(src.base_addr, src.block_ids),
            src.agent_name,
        )
        state = agent.transfer(xfer)
        while state == "PROC":
            state = agent.check_xfer_state(xfer)
        agent.release_xfer_handle(xfer)
        assert state == "DONE", state
        return time.perf_counter() - t

    def ray_get(self, refs, local: list[int]) -> float:
        t = time.perf_counter()
        data = ray.get(refs[0])
        self.pool.index_copy_(0, torch.tensor(local), data)
        return time.perf_counter() - t

    def checksum(self, ids: list[int]) -> float:
        return float(self.pool[ids].double().sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kv_transfer.json"))
    args = ap.parse_args()

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 1024**3, "include_dashboard": False},
    )
    for res in ("prefill_node", "decode_node"):
        cluster.add_node(num_cpus=1, resources={res: 1}, object_store_memory=1024**3)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        p, d = Prefill.remote(), Decode.remote()
        rows = []
        for tokens in PROMPTS:
            n = tokens // BLOCK
            src_ids = list(range(3, 3 + 2 * n, 2))[:n]  # scattered, like a real pool
            dst_ids = list(range(POOL_BLOCKS - n, POOL_BLOCKS))
            nbytes = n * LAYERS * 2 * BLOCK * KV_HEADS * HEAD_DIM * 4
            src, _ = ray.get(p.describe.remote(src_ids, f"warm-{tokens}"))
            ray.get(d.transfer_pull.remote(src, dst_ids))  # handshake, warm caches
            times = {"transfer/": [], "transfer+claim": [], "raw NIXL": [], "Ray store": []}
            for r in range(args.reps):
                src, epoch = ray.get(p.describe.remote(src_ids, f"t{tokens}-{r}"))
                times["transfer/"].append(ray.get(d.transfer_pull.remote(src, dst_ids)))
                times["transfer+claim"].append(
                    ray.get(d.transfer_claim_pull.remote(p, f"t{tokens}-{r}", epoch, src, dst_ids))
                )
                times["raw NIXL"].append(ray.get(d.raw_nixl.remote(src, dst_ids)))
                t = time.perf_counter()
                refs = ray.get(p.put.remote(src_ids))
                ray.get(d.ray_get.remote(refs, dst_ids))
                times["Ray store"].append(time.perf_counter() - t)
                del refs
            assert (
                abs(ray.get(p.checksum.remote(src_ids)) - ray.get(d.checksum.remote(dst_ids)))
                < 1e-6
            )
            med = {k: statistics.median(v) for k, v in times.items()}
            gbps = {k: nbytes / v / 1e9 for k, v in med.items()}
            rows.append(
                {
                    "prompt_tokens": tokens,
                    "blocks": n,
                    "bytes": nbytes,
                    "median_s": med,
                    "GBps": gbps,
                    "transfer_vs_raw": gbps["transfer/"] / gbps["raw NIXL"],
                    "claim_path_vs_raw": gbps["transfer+claim"] / gbps["raw NIXL"],
                    "nixl_vs_ray": gbps["raw NIXL"] / gbps["Ray store"],
                }
            )
    finally:
        ray.shutdown()
        cluster.shutdown()

    print(
        f"{'tokens':>6} {'MiB':>6} | {'transfer/':>9} {'+claim':>7} {'raw NIXL':>8} "
        f"{'Ray store':>9} GB/s | transfer/raw  claim-path/raw  NIXL/Ray"
    )
    for r in rows:
        g = r["GBps"]
        print(
            f"{r['prompt_tokens']:>6} {r['bytes'] / 2**20:>6.1f} | {g['transfer/']:>9.2f} "
            f"{g['transfer+claim']:>7.2f} {g['raw NIXL']:>8.2f} {g['Ray store']:>9.2f}      | "
            f"{r['transfer_vs_raw']:>12.2f}  {r['claim_path_vs_raw']:>14.2f}  "
            f"{r['nixl_vs_ray']:>8.1f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "cpu": cpu_model(),
                "torch_threads": torch.get_num_threads(),
                "transport": "CPU DRAM over UCX",
                "reps": args.reps,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
