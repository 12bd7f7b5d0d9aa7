"""One NIXL transfer agent in its own process (and, on the testbed, its own network
namespace), driven over stdin/stdout by tests/integration/test_network_deadlines.py.

It owns a small DRAM pool filled with values of its own, prints its blocks' `RankKV`
(the agent metadata travels through the pipe, never the network), then answers one
JSON line per command, each on a thread of its own so that one call that waits on the
network holds up none of the others:

- `{"op": "pull", "id": k, "kv": ..., "at": i, "timeout": s}`: READ the blocks of `kv`
  into ours from block `i` on (tagged `k`); answers `ok`, the error's type, the seconds
  it took and a digest of the blocks it wrote.
- `{"op": "notifs", "id": k}`: `poll_notifs` (how long the call took; how many
  notifications arrived since the start).
- `{"op": "digest", "id": k, "at": i}`: a digest of our blocks from `i` on, and the
  peers the agent caches.
- `{"op": "fill", "id": k, "at": i, "value": v}`: our blocks from `i` on set to `v`, as
  when the engine gives them to another request.
- `{"op": "release", "id": k}`: `release_stuck()` (the ids of pulls whose blocks are safe
  again) and how many READs are still held.

The first line it prints holds `RankKV` of its blocks 0 to HALF - 1 and their digest.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import sys
import threading
import time

import torch

from transfer.nixl_backend import NixlTransferAgent

BLOCKS, HALF, BLOCK_SHAPE = 16, 8, (2, 32, 64)  # 16 KiB a block, 128 KiB a pull


def encode(obj) -> str:
    return base64.b64encode(pickle.dumps(obj)).decode()


def main(name: str, seed: int) -> None:
    # Replies on a stdout of their own: NIXL logs to fd 1, which now goes to stderr.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    g = torch.Generator().manual_seed(seed)
    pool = torch.rand((BLOCKS, *BLOCK_SHAPE), generator=g)
    agent = NixlTransferAgent(name, pool)
    out = threading.Lock()
    notified = [0]

    def say(msg: dict) -> None:
        with out:
            print(json.dumps(msg), file=replies, flush=True)

    def digest(at: int) -> str:
        return hashlib.sha256(pool[at : at + HALF].numpy().tobytes()).hexdigest()[:16]

    def serve(cmd: dict) -> None:
        t0, reply = time.monotonic(), {"id": cmd["id"]}
        if cmd["op"] == "pull":
            src = pickle.loads(base64.b64decode(cmd["kv"]))
            blocks, tag = list(range(cmd["at"], cmd["at"] + HALF)), str(cmd["id"])
            try:
                agent.pull(src, blocks, timeout_s=cmd["timeout"], notif=b"done", tag=tag)
                reply["ok"] = True
            except Exception as e:  # noqa: BLE001 - the test reads which one
                reply.update(ok=False, error=type(e).__name__, message=str(e))
            reply["digest"] = digest(cmd["at"])
        elif cmd["op"] == "notifs":
            with out:
                notified[0] += len(agent.poll_notifs())
                reply["n"] = notified[0]
        elif cmd["op"] == "digest":
            reply.update(digest=digest(cmd["at"]), peers=agent.num_peers())
        elif cmd["op"] == "release":  # as decode's engine thread does every tick
            reply.update(released=agent.release_stuck(), stuck=agent.stuck_reads)
        elif cmd["op"] == "fill":  # blocks given to another request: written anew
            pool[cmd["at"] : cmd["at"] + HALF].fill_(cmd["value"])
            reply["digest"] = digest(cmd["at"])
        reply["elapsed"] = time.monotonic() - t0
        say(reply)

    say({"kv": encode(agent.rank_kv(list(range(HALF)))), "digest": digest(0)})
    for line in sys.stdin:
        threading.Thread(target=serve, args=(json.loads(line),), daemon=True).start()
    agent.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
