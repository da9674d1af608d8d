"""Conversions from the shipped GGUF files to the folders the runtimes load.

Guarantees:
- `hf-bf16`: a normal transformers folder (safetensors in bf16, tokenizer, generation config),
  loadable with `from_pretrained(folder)` and no gguf package.
- `onnx-int4`: an onnxruntime-genai CPU folder (int4 weights, genai_config.json and the
  tokenizer files) built by `onnxruntime_genai.models.builder` in a subprocess, from an fp32
  transformers copy of the GGUF weights (so nothing is rounded to bf16 before int4).
- `check_tokenizers` fails with `ModelsError` unless two folders' tokenizers are identical.
torch, transformers and the builder are imported only inside these functions. Each function
writes only into the folder it is given (and its scratch folder, removed afterwards).
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from tandem.models.registry import ModelsError, progress_bar

logger = logging.getLogger(__name__)

# Files a tokenizer folder may have; the builder and the runtimes need them next to the model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")


def convert(kind: str, source: Path, out: Path, scratch: Path) -> None:
    """Convert the single .gguf file in `source` into `out` (which exists and is empty)."""
    ggufs = sorted(source.glob("*.gguf"))
    if len(ggufs) != 1:
        raise ModelsError(f"expected one .gguf file in {source}, found {len(ggufs)}")
    try:
        if kind == "hf-bf16":
            gguf_to_hf(ggufs[0], out, "bfloat16")
        elif kind == "onnx-int4":
            build_onnx_int4(ggufs[0], out, scratch)
        else:
            raise ModelsError(f"unknown conversion {kind!r}")
    except ImportError as exc:
        raise ModelsError(f"converting models needs the cloud and convert extras "
                          f"(pip install 'tandem[cloud,convert,edge]'): {exc}") from None
    except OSError:
        raise
    except Exception as exc:  # safetensors and torch wrap a full disk in their own errors
        if "No space left on device" in str(exc) or "StorageFull" in str(exc):
            raise OSError(errno.ENOSPC, "No space left on device", str(out)) from exc
        raise


def gguf_to_hf(gguf: Path, out: Path, dtype: str) -> None:
    """Load a GGUF with transformers (dequantized to `dtype`) and save a normal HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    logger.info("loading %s as %s (dequantizing)", gguf.name, dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=getattr(torch, dtype))
    # save_pretrained refuses GGUF-quantized models; the weights are already dequantized.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    gen = model.generation_config
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    logger.info("loaded in %.1f s; saving %s", time.monotonic() - t0, out.name)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    logger.info("%s saved in %.1f s", out.name, time.monotonic() - t0)


def build_onnx_int4(gguf: Path, out: Path, scratch: Path) -> None:
    """Build the int4 CPU onnxruntime-genai model from `gguf` via an fp32 HF copy."""
    shutil.rmtree(scratch, ignore_errors=True)
    hf32 = scratch / "hf-fp32"
    hf32.mkdir(parents=True)
    log = scratch.with_name(scratch.name + ".builder.log")  # kept when the build fails
    try:
        gguf_to_hf(gguf, hf32, "float32")
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf32),
               "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(scratch / "cache")]
        _run_with_clock(cmd, log, f"building {out.name.removesuffix('.partial')}")
        log.unlink()
        for name in TOKENIZER_FILES:
            if (hf32 / name).exists() and not (out / name).exists():
                shutil.copy2(hf32 / name, out / name)
        for needed in ("genai_config.json", "tokenizer.json", "tokenizer_config.json"):
            if not (out / needed).exists():
                raise ModelsError(f"the ONNX builder wrote no {needed} in {out}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_with_clock(cmd: list[str], log: Path, desc: str) -> None:
    """Run `cmd` with its output in `log`, showing a step line with the elapsed time."""
    t0 = time.monotonic()
    done = threading.Event()
    with open(log, "w") as f, progress_bar(None, desc, unit="s") as bar:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)

        def tick() -> None:
            while not done.wait(1.0):
                bar.update(1)

        clock = threading.Thread(target=tick, daemon=True)
        clock.start()
        try:
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
            done.set()
            clock.join()
    text = log.read_text(errors="replace")
    if rc != 0:
        if "No space left on device" in text:
            raise OSError(errno.ENOSPC, "No space left on device", str(log.parent))
        lines = [ln for ln in text.splitlines() if ln.strip()]
        raise ModelsError(f"{desc} failed (exit {rc}, log {log}): "
                          f"{lines[-1] if lines else 'no output'}")
    logger.info("%s: done in %.1f s", desc, time.monotonic() - t0)


def _tokenizer_view(folder: Path) -> dict[str, object]:
    """What must match between two tokenizers: vocab, merges, added and special tokens."""
    data = json.loads((folder / "tokenizer.json").read_text())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    model = data.get("model", {})
    specials = {k: config.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return {
        "vocab": model.get("vocab"),
        "merges": model.get("merges"),
        "added_tokens": data.get("added_tokens"),
        "pre_tokenizer": data.get("pre_tokenizer"),
        "normalizer": data.get("normalizer"),
        "decoder": data.get("decoder"),
        "specials": specials,
    }


def check_tokenizers(a: Path, b: Path) -> str:
    """Raise `ModelsError` unless the tokenizers in folders `a` and `b` are identical."""
    try:
        view_a, view_b = _tokenizer_view(a), _tokenizer_view(b)
    except (OSError, ValueError) as exc:
        raise ModelsError(f"cannot read tokenizers for the check: {exc}") from None
    differ = [k for k in view_a if view_a[k] != view_b[k]]
    if differ:
        raise ModelsError(f"tokenizers of {a.name} and {b.name} differ in {', '.join(differ)}; "
                          "the pair must share one vocabulary")
    vocab: dict[str, int] = view_a["vocab"] or {}  # type: ignore[assignment]
    added: list[dict[str, object]] = view_a["added_tokens"] or []  # type: ignore[assignment]
    ids = [*vocab.values(), *(int(t["id"]) for t in added)]  # type: ignore[call-overload]
    size = max(ids) + 1 if ids else 0
    return f"identical tokenizers, {size} token ids, specials {view_a['specials']}"
