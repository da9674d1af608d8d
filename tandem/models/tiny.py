"""Tiny random-weight Qwen2 models for fast tests: an HF folder plus its ONNX export.

Built in a temp folder (once per test session, or by `tandem bench --suite cloud-scale --models
tiny`). They are real models on the real runtimes (transformers and onnxruntime-genai), only small
and random, so acceptance rates mean nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

VOCAB = 512
EOS_ID = 2


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _tokenizer(out: Path) -> None:
    """A byte-level BPE trained on a few sentences: the same kind of tokenizer as Qwen's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["def add(a, b):\n    return a + b\n", "The river shapes the valley over many years.",
              "Hello, how are you today? I am fine, thank you.", "import json\nfrom pathlib import Path\n"] * 20
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def build_hf(out: Path, seed: int, layers: int = 2, hidden: int = 64) -> Path:
    """A random Qwen2 causal LM with weights large enough that argmax is rarely a near-tie."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=EOS_ID,
        pad_token_id=0,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=0).save_pretrained(out)
    _tokenizer(out)
    return out


def build_onnx(hf_dir: Path, out: Path, cache: Path) -> Path:
    """Export with the onnxruntime-genai model builder, fp32 CPU."""
    subprocess.run(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
         "-p", "fp32", "-e", "cpu", "-c", str(cache)],
        check=True,
        capture_output=True,
    )
    cfg = json.loads((out / "genai_config.json").read_text())
    assert cfg["model"]["vocab_size"] == VOCAB
    if (hf_dir / "chat_template.jinja").exists():  # the builder does not carry it over
        shutil.copy(hf_dir / "chat_template.jinja", out / "chat_template.jinja")
    return out


def perturb(src: Path, out: Path, noise: float, seed: int) -> Path:
    """A copy of `src` with Gaussian noise on every weight: a drafter that agrees only partly."""

    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * noise * param.std())
    model.save_pretrained(out)
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out
