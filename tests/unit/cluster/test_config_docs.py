"""docs/config.md is generated from the config structs and must match them."""

from __future__ import annotations

from tools import config_docs


def test_config_reference_is_up_to_date():
    want = config_docs.render()
    have = config_docs.OUT.read_text() if config_docs.OUT.exists() else ""
    assert have == want, (
        f"docs/config.md is out of date with the config structs: run `{config_docs.COMMAND}`"
    )


def test_config_reference_has_every_key():
    """Each leaf key of every section is a row, with its bound where it has one."""
    text = config_docs.render()
    for row in (
        "| `router.port` | int | `8000` | >= 1, <= 65535 |",
        "| `model.dtype` | str | `float32` | one of `bfloat16`, `float16`, `float32` |",
        "| `cluster.nodes[].name` | str | required |",
        "| `transfer.faults.hang_s` | float | `5.0` | >= 0 |",
        "| `chaos.soak.rejected_share` | float | `0.2` | >= 0, < 1 |",
        "| `chaos.thresholds.excuse_in_flight` | bool | `false` |",
    ):
        assert row in text, row
