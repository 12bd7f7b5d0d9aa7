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
    )
    return KVHandle(request_id="r1", backend="nixl", num_tokens=40, ranks=[rank])


def test_handle_roundtrips_through_pickle_and_msgpack():
    h = _handle()
    assert pickle.loads(pickle.dumps(h)) == h
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(h), type=KVHandle) == h
    assert (h.epoch, h.expires_at) == (0, 0.0)


def test_handle_is_frozen():
    with pytest.raises(AttributeError):
        _handle().num_tokens = 1


@pytest.mark.parametrize("cls", [TransferError, TransferTimeout, TransferFailed, LeaseExpired])
def test_errors_pickle_with_their_message(cls):
    e = pickle.loads(pickle.dumps(cls("peer gone")))
    assert type(e) is cls and str(e) == "peer gone" and isinstance(e, TransferError)
