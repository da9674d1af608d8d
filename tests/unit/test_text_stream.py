"""`TextStream`: the pieces it hands out add up to decode(all tokens), and the work is linear.

The fake tokenizers map ids to byte strings, some of which are pieces of multi-byte characters,
lone continuation bytes, a literal U+FFFD, or nothing (a skipped special token); one strips a
leading space the way SentencePiece decoders do. A real byte-level BPE (the kind Qwen uses) is
trained here on a few sentences in milliseconds. Seeds are fixed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest

from edge_node.text import TextStream

Decode = Callable[[Sequence[int]], str]

_PIECES: list[bytes] = [
    b"a", b"b", b" ", b"\n", b"the", b" river", b"def", b"()",
    "é".encode(), "é".encode()[:1], "é".encode()[1:],  # a 2-byte character, whole and split
    "日".encode(), "日".encode()[:1], "日".encode()[1:], "日".encode()[:2], "日".encode()[2:],
    "🙂".encode(), "🙂".encode()[:1], "🙂".encode()[1:3], "🙂".encode()[3:],  # 4 bytes, split
    b"\x80", b"\xff",  # never valid
    "\ufffd".encode(),  # a real U+FFFD in the text
    b"",  # a special token that decodes to nothing
]


def fake_decode(ids: Sequence[int]) -> str:
    return b"".join(_PIECES[i] for i in ids).decode("utf-8", errors="replace")


def fake_sentencepiece_decode(ids: Sequence[int]) -> str:
    """Like a Metaspace decoder: one leading space of the whole text is dropped."""
    text = fake_decode(ids)
    return text[1:] if text.startswith(" ") else text


class Counting:
    """Wraps a decode function and counts the tokens it is asked to decode."""

    def __init__(self, decode: Decode) -> None:
        self.decode = decode
        self.tokens = 0

    def __call__(self, ids: Sequence[int]) -> str:
        self.tokens += len(ids)
        return self.decode(ids)


def stream(decode: Decode, ids: list[int], rng: random.Random, max_push: int = 4) -> str:
    """Push `ids` in random-sized groups (empty ones included), then flush."""
    text = TextStream(decode)
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(0, max_push)
        out.append(text.push(ids[i:i + n]))
        i += n
    out.append(text.flush())
    return "".join(out)


@pytest.mark.parametrize("decode", [fake_decode, fake_sentencepiece_decode])
def test_pieces_add_up_to_the_whole_with_a_fake_tokenizer(decode: Decode) -> None:
    rng = random.Random(0)
    for _ in range(400):
        ids = [rng.randrange(len(_PIECES)) for _ in range(rng.randint(0, 60))]
        assert stream(decode, ids, rng) == decode(ids), ids


def test_split_character_is_held_until_complete_with_a_fake_tokenizer() -> None:
    smile = [_PIECES.index(p) for p in ("🙂".encode()[:1], "🙂".encode()[1:3], "🙂".encode()[3:])]
    text = TextStream(fake_decode)
    assert text.push([0]) == "a"
    assert text.push(smile[:1]) == ""
    assert text.push(smile[1:2]) == ""
    assert text.push(smile[2:]) == "🙂"
    assert text.flush() == ""


def test_flush_hands_out_an_unfinished_character_with_a_fake_tokenizer() -> None:
    text = TextStream(fake_decode)
    half = _PIECES.index("é".encode()[:1])
    assert text.push([0, half]) == "a"
    assert text.flush() == "\ufffd"


@pytest.mark.parametrize("pieces", [
    None,  # random tokens
    ["\ufffd".encode()],  # the model writes U+FFFD again and again
    [b"\x80"],  # ... or bytes that are never valid
    [b"", b"a"],  # ... or special tokens that decode to nothing
])
def test_work_is_linear_with_a_fake_tokenizer(pieces: list[bytes] | None) -> None:
    n = 2000
    rng = random.Random(1)
    choices = range(len(_PIECES)) if pieces is None else [_PIECES.index(p) for p in pieces]
    ids = [rng.choice(choices) for _ in range(n)]
    counting = Counting(fake_decode)
    assert stream(counting, ids, rng) == fake_decode(ids)
    assert counting.tokens < 20 * n, f"decoded {counting.tokens} tokens for {n}"


def test_one_token_at_a_time_is_linear_with_a_fake_tokenizer() -> None:
    n = 2000
    rng = random.Random(2)
    ids = [rng.randrange(len(_PIECES)) for _ in range(n)]
    counting = Counting(fake_decode)
    assert stream(counting, ids, rng, max_push=1) == fake_decode(ids)
    assert counting.tokens < 20 * n, f"decoded {counting.tokens} tokens for {n}"


@pytest.fixture(scope="module")
def byte_level_bpe() -> Decode:
    """A tiny byte-level BPE, trained here: the same kind of tokenizer as Qwen's."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Hello, wörld! Ça va? 日本語のテキスト 🙂🚀 naïve café", "def add(a, b):\n    return a + b\n",
              "Слово и ещё одно слово; ελληνικά γράμματα"] * 10
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() > 300

    def decode(ids: Sequence[int]) -> str:
        return tok.decode(list(ids))

    decode.vocab_size = tok.get_vocab_size()  # type: ignore[attr-defined]
    decode.encode = lambda s: tok.encode(s).ids  # type: ignore[attr-defined]
    return decode


def test_pieces_add_up_to_the_whole_with_a_byte_level_bpe(byte_level_bpe: Decode) -> None:
    rng = random.Random(3)
    vocab = byte_level_bpe.vocab_size  # type: ignore[attr-defined]
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 60))]
        assert stream(byte_level_bpe, ids, rng) == byte_level_bpe(ids), ids
    sentence = "naïve café 日本語 🙂🚀, Слово!"
    ids = byte_level_bpe.encode(sentence)  # type: ignore[attr-defined]
    assert stream(byte_level_bpe, ids, rng, max_push=1) == sentence


def test_work_is_linear_with_a_byte_level_bpe(byte_level_bpe: Decode) -> None:
    n = 2000
    rng = random.Random(4)
    ids = [rng.randrange(byte_level_bpe.vocab_size) for _ in range(n)]  # type: ignore[attr-defined]
    counting = Counting(byte_level_bpe)
    assert stream(counting, ids, rng, max_push=2) == byte_level_bpe(ids)
    assert counting.tokens < 20 * n, f"decoded {counting.tokens} tokens for {n}"
