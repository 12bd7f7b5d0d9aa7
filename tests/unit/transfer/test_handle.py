"""KVHandle and the transfer errors survive the trips they make (Ray pickling, msgpack)."""

from __future__ import annotations

import pickle

import msgspec
import pytest

from transfer import (
    KVHandle,
    LeaseExpired,
    RankKV,
    TransferError,
    TransferFailed,
    TransferTimeout,
)
from transfer.handle import check_blocks_match


def _handle() -> KVHandle:
    rank = RankKV(
        agent_name="prefill-0-abc",
        agent_metadata=b"\x00md\xff",
        base_addr=1 << 40,
        num_blocks=512,
        block_bytes=4096,
        device_id=0,
        mem_type="DRAM",
        block_ids=[7, 3, 9],
        block_shape=[2, 2, 2, 16, 8],
    )
    return KVHandle(request_id="r1", backend="nixl", num_tokens=40, ranks=[rank])


def test_handle_roundtrips_through_pickle_and_msgpack():
    h = _handle()
    assert pickle.loads(pickle.dumps(h)) == h
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(h), type=KVHandle) == h
    assert (h.epoch, h.ttl_s) == (0, 0.0)


def test_handle_is_frozen():
    with pytest.raises(AttributeError):
        _handle().num_tokens = 1


@pytest.mark.parametrize("cls", [TransferError, TransferTimeout, TransferFailed, LeaseExpired])
def test_errors_pickle_with_their_message(cls):
    e = pickle.loads(pickle.dumps(cls("peer gone")))
    assert type(e) is cls and str(e) == "peer gone" and isinstance(e, TransferError)


def test_blocks_of_another_layout_are_refused_even_at_equal_size():
    """A peer whose blocks have our byte size but another layout (the KV pool was
    [layers, 2, block_size, kv_heads, head_dim] per block before it went head-major),
    or that names no layout (an older peer), is refused before any byte moves, as a
    transfer failure (the router re-prefills elsewhere)."""
    src = _handle().ranks[0]
    ours = (2, 2, 2, 16, 8)
    check_blocks_match(src, [0, 1, 2], 4096, ours)  # same: no error
    for shape in ([2, 2, 16, 2, 8], []):
        peer = msgspec.structs.replace(src, block_shape=shape)
        with pytest.raises(TransferFailed, match="pdcluster version"):
            check_blocks_match(peer, [0, 1, 2], 4096, ours)
    with pytest.raises(TransferFailed):
        check_blocks_match(src, [0, 1, 2], 8192, ours)
    with pytest.raises(ValueError, match="2 local blocks for 3"):
        check_blocks_match(src, [0, 1], 4096, ours)
