"""Sentence embeddings on the device: all-MiniLM-L6-v2 on PyTorch CPU.

Guarantees:
- `Embedder.embed(texts)` returns float32 vectors of shape (len(texts), 384), each of unit L2
  norm: the model's token states mean-pooled over the attention mask, then normalized, which is
  what the folder's `1_Pooling` and `2_Normalize` modules (and sentence-transformers) compute.
  The dot product of two vectors is their cosine similarity.
- Inputs are truncated at the model's `max_seq_length` word pieces (256, read from
  `sentence_bert_config.json`), as sentence-transformers does.
- Importing this module imports neither torch nor transformers; the constructor does, and it only
  reads the local folder (no hub access). It changes torch's thread count only when asked.
- `embed` may be called from several threads: calls are serialized by a lock (the fast tokenizer
  keeps mutable truncation/padding state and must not be shared by concurrent calls).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MODEL_NAME = "all-MiniLM-L6-v2"
FETCH_COMMAND = "tandem models fetch --only minilm"


class EmbedderMissing(FileNotFoundError):
    """The embedder's folder is absent or incomplete; the message says how to fetch it."""


class Embedder:
    """all-MiniLM-L6-v2 (a sentence-transformers folder) run with transformers on torch CPU."""

    name: str = MODEL_NAME

    def __init__(self, model_dir: Path, *, num_threads: int | None = None) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise EmbedderMissing(
                f"no embedder at {model_dir}: run `{FETCH_COMMAND}`")
        import torch
        from transformers import AutoModel, AutoTokenizer

        if num_threads is not None:
            if num_threads < 1:
                raise ValueError(f"num_threads: must be >= 1, got {num_threads}")
            torch.set_num_threads(num_threads)
        self.model_dir = model_dir
        self.max_seq_length = _max_seq_length(model_dir)
        _check_pooling(model_dir)
        self._tokenizer: Any = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self._model: Any = AutoModel.from_pretrained(model_dir, local_files_only=True)
        self._model.eval()
        self.dim: int = int(self._model.config.hidden_size)
        self._lock = threading.Lock()
        logger.info("embedder %s loaded from %s (dim %d, max %d word pieces)",
                    self.name, model_dir, self.dim, self.max_seq_length)

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Unit-norm float32 embeddings, shape (len(texts), dim), in the order of `texts`."""
        if isinstance(texts, str):
            raise TypeError("texts: expected a sequence of strings, got one string")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Longest first, so each batch pads to similar lengths; results go back in input order.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            with self._lock:  # per batch: a query's embedding waits one batch, not a whole document
                out[idx] = self._embed_batch([texts[i] for i in idx])
        return out

    def _embed_batch(self, batch: list[str]) -> np.ndarray:
        import torch

        enc = self._tokenizer(batch, padding=True, truncation=True,
                              max_length=self.max_seq_length, return_tensors="pt")
        with torch.inference_mode():
            states = self._model(**enc).last_hidden_state  # (b, t, dim)
            mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)  # (b, t, 1)
            summed = (states * mask).sum(dim=1)
            pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
            unit = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return unit.float().numpy()


def default_embedder(*, num_threads: int | None = None) -> Embedder:
    """The embedder in Tandem's models folder; `EmbedderMissing` names the fetch command."""
    from tandem.models import registry as models

    folder = models.model_dir(models.MINILM)
    verdict = models.verify_folder(folder, deep=False)
    if not verdict.ok:
        raise EmbedderMissing(
            f"the embedder {MODEL_NAME} is not available at {folder} ({verdict.reason}): "
            f"run `{FETCH_COMMAND}`")
    return Embedder(folder, num_threads=num_threads)


def _max_seq_length(model_dir: Path) -> int:
    cfg = _read_json(model_dir / "sentence_bert_config.json")
    value = cfg.get("max_seq_length")
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{model_dir}/sentence_bert_config.json: bad max_seq_length {value!r}")
    return value


def _check_pooling(model_dir: Path) -> None:
    """Only mean pooling is implemented; refuse a folder that asks for another."""
    path = model_dir / "1_Pooling" / "config.json"
    if not path.is_file():
        return  # plain transformers folder: mean pooling is the sentence-transformers default
    cfg = _read_json(path)
    if not cfg.get("pooling_mode_mean_tokens", False):
        raise ValueError(f"{path}: only mean-token pooling is supported")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EmbedderMissing(f"cannot read {path} ({err}): run `{FETCH_COMMAND}`") from err
    if not isinstance(data, dict):
        raise EmbedderMissing(f"{path}: expected a JSON object; run `{FETCH_COMMAND}`")
    return data
