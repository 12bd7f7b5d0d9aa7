"""API keys, as a user turns them on: `pdcluster up` with $PDCLUSTER_API_KEYS_FILE
naming a file of keys. Every /v1/* route, /tokenize and /debug/state then need
`Authorization: Bearer <key>` (401 in OpenAI's shape otherwise, which the official
client raises as AuthenticationError); /health and /metrics stay open."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import yaml

from tests.support import ROOT

PORT = 8029
KEYS = ["sk-first-key-0001", "sk-second-key-0002"]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keys")
    keys = tmp / "keys.txt"
    keys.write_text("# one key per line\n" + "\n".join(KEYS) + "\n")
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["router"]["port"] = PORT
    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PDCLUSTER_API_KEYS_FILE": str(keys)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdcluster", "up", str(path)],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "stderr").open("w"),
    )
    base = f"http://127.0.0.1:{PORT}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp / "stderr").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "cluster did not come up"
            time.sleep(1)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def test_every_v1_route_needs_a_key_and_health_and_metrics_do_not(url):
    bad = _client(url, "sk-not-a-key")
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny-llama", "prompt": "x"}, timeout=10)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.post(f"{url}/tokenize", json={"prompt": "x"}, timeout=10).status_code == 401
    assert httpx.get(f"{url}/debug/state", timeout=10).status_code == 401
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200


def test_each_key_of_the_file_is_accepted(url):
    for key in KEYS:
        c = _client(url, key)
        out = c.completions.create(model="tiny-llama", prompt="hi", max_tokens=3, temperature=0)
        assert out.usage.completion_tokens >= 1
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    state = httpx.get(f"{url}/debug/state", headers=auth, timeout=10).json()
    assert state["requests_in_flight"] == 0
