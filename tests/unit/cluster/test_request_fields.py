"""docs/request-fields.md is generated from the request structs and the admission
policy, and must match them; every field either struct knows has a row."""

from __future__ import annotations

from cluster.protocol import ChatCompletionRequest, CompletionRequest
from tools import request_fields


def test_request_field_reference_is_up_to_date():
    have = request_fields.OUT.read_text() if request_fields.OUT.exists() else ""
    assert have == request_fields.render(), (
        f"docs/request-fields.md is out of date: run `{request_fields.COMMAND}`"
    )


def test_every_known_field_has_a_row_saying_what_happens():
    text = request_fields.render()
    for name in {*ChatCompletionRequest.__struct_fields__, *CompletionRequest.__struct_fields__}:
        row = next(ln for ln in text.splitlines() if ln.startswith(f"| `{name}` |"))
        assert any(w in row for w in ("supported:", "ignored:", "400 when used:")), row
