"""The router process loads neither torch nor nixl: its imports, its tokenizer, and
the worker actor classes (Ray imports an actor's class module to build a handle)."""

from __future__ import annotations

import subprocess
import sys


def test_router_imports_neither_torch_nor_nixl(tiny_model_dir):
    code = f"""
import sys
import cluster.router
import workers.decode_worker, workers.prefill_worker, workers.rank_worker
from transformers import PreTrainedTokenizerFast
tok = PreTrainedTokenizerFast.from_pretrained({str(tiny_model_dir)!r})
tok.apply_chat_template([{{"role": "user", "content": "hi"}}], add_generation_prompt=True,
                        tokenize=True, return_dict=False)
print(sorted(m for m in ("torch", "nixl") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
