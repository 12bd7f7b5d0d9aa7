"""How long a READ given up in flight holds its blocks (`late_write_s`), read from UCX's
TCP settings as the process has them: the connect's bound (2^(SYN_CNT+1) - 1 s), then
twice the user timeout (the request's retransmissions, then the reply's), + 2 s."""

from __future__ import annotations

import logging

import pytest

from transfer.nixl_backend import UCX_DEFAULTS, late_write_s


@pytest.mark.parametrize(
    ("user", "syn", "want"),
    [
        (None, None, 7 + 2 * 8 + 2),  # the backend's own: 8 s, 2 SYN retransmits
        ("500ms", "1", 3 + 2 * 0.5 + 2),
        ("1m", "1", 3 + 2 * 60 + 2),
        (" 2 s ", "3", 15 + 2 * 2 + 2),
        ("inf", "2", 7 + 2 * 925 + 2),  # no user timeout: the kernel's own retransmissions
    ],
)
def test_the_hold_follows_ucxs_tcp_settings(monkeypatch, user, syn, want):
    for key, value in (("UCX_TCP_USER_TIMEOUT", user), ("UCX_TCP_SYN_CNT", syn)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    assert late_write_s() == pytest.approx(want)


def test_a_setting_not_understood_holds_as_long_as_the_kernel_may_deliver(monkeypatch, caplog):
    monkeypatch.setenv("UCX_TCP_USER_TIMEOUT", "1.2.3s")
    monkeypatch.setenv("UCX_TCP_SYN_CNT", "auto")
    with open("/proc/sys/net/ipv4/tcp_syn_retries") as f:
        connect = 2 ** (int(f.read()) + 1) - 1
    with caplog.at_level(logging.WARNING):
        assert late_write_s() == connect + 2 * 925 + 2
    assert "not understood" in caplog.text
    assert set(UCX_DEFAULTS) >= {"UCX_TCP_USER_TIMEOUT", "UCX_TCP_SYN_CNT", "UCX_TCP_CONN_NB"}
