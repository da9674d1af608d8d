"""The personal store and retrieval with the real all-MiniLM-L6-v2 embedder on CPU."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from orchestrator.embedder import Embedder, default_embedder
from orchestrator.errors import BadRequest, NotFound
from orchestrator.retrieval import inject_context, prompt_to_messages, search
from orchestrator.store import MAX_DOCUMENT_BYTES, SCHEMA_VERSION, PersonalStore

VET = ("My cat Miso's vet is Dr. Alvarez at the Riverside Animal Clinic on Elm Street. "
       "Miso gets her yearly checkup and vaccines every March.")
DECORATORS = ("A decorator in Python is a function that takes another function and returns a "
              "new function wrapping it. You apply it with the @name syntax on the line above "
              "def. functools.wraps keeps the wrapped function's name and docstring.")
DIET = "I am vegetarian and severely allergic to peanuts."
JOURNAL = [
    ("Monday. The weather turned cold and windy, so I spent the afternoon covering the tomato "
     "beds in the garden and moving the basil pots inside. The rain gauge showed 12 mm."),
    ("Work notes: the quarterly report is due on Friday. Priya wants the sales figures split by "
     "region, and the slide deck needs a new chart for the churn numbers."),
    ("Tuesday. Went running along the river, 8 km in 46 minutes. My knee felt fine. I should buy "
     "new running shoes before the half marathon in October."),
    ("Reading list: finish 'The Left Hand of Darkness', then start the biography of Ada Lovelace "
     "that Sam recommended. The library hold expires next week."),
    ("Budget: rent went up to 1450 a month in May. Move 200 a month into the savings account and "
     "cancel the unused streaming subscription."),
    ("Saturday. Repainted the hallway a pale green; two coats were needed. The leftover paint is "
     "in the garage next to the bicycle pump."),
    VET,
    ("Sunday. Tried a new recipe for lentil soup with cumin and smoked paprika; it needs more salt "
     "next time. Leftovers are in the freezer."),
    ("Home repairs: the bathroom faucet drips again. The plumber, Marek, can come on the 14th "
     "between 9 and 11. Ask him about the water heater's pressure valve too."),
    ("Called Mom about the family reunion in August. She wants everyone to bring a dish; I will "
     "make the lemon tart. Book the train tickets early."),
    ("Guitar practice: learned the F barre chord at last. Next, the fingerpicking pattern from "
     "the second lesson, twenty minutes a day."),
    ("Car: the winter tyres go on in November; the garage on Oak Road has a slot on the 3rd. The "
     "insurance renewal letter arrived, compare quotes first."),
]
TRIP = ("Our trip to Lisbon is booked from June 12 to June 19. The hotel is in Alfama and the "
        "flight leaves at 7:40 from Terminal 2.")


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return default_embedder()


@pytest.fixture(scope="module")
def corpus(embedder: Embedder, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[PersonalStore]:
    store = PersonalStore(tmp_path_factory.mktemp("corpus") / "store.sqlite3", embedder)
    store.add("Vet", VET, kind="note")
    store.add("Python decorators", DECORATORS, privacy="shareable", source="/docs/deco.md")
    store.add("Diet", DIET, kind="profile")
    store.add("Lisbon trip", TRIP)
    yield store
    store.close()


@pytest.fixture
def store(embedder: Embedder, tmp_path: Path) -> Iterator[PersonalStore]:
    s = PersonalStore(tmp_path / "store.sqlite3", embedder)
    yield s
    s.close()


def test_embedder_gives_unit_vectors_independent_of_batching(embedder: Embedder) -> None:
    texts = ["short", "a much longer sentence about cats and their veterinarians " * 3, "x"]
    together = embedder.embed(texts)
    assert together.shape == (3, 384) and together.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    alone = np.stack([embedder.embed([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)


def test_embedder_truncates_at_max_seq_length(embedder: Embedder) -> None:
    assert embedder.max_seq_length == 256 and embedder.dim == 384
    head = "alpha beta gamma delta " * 70  # 280 words: already past 256 word pieces
    long_vecs = embedder.embed([head, head + "completely different tail words " * 300])
    np.testing.assert_allclose(long_vecs[0], long_vecs[1], atol=1e-5)


@pytest.mark.parametrize(("query", "title", "privacy"), [
    ("Who looks after my pet's health?", "Vet", "private"),
    ("how do I wrap a function with the @ syntax", "Python decorators", "shareable"),
    ("what food should I avoid?", "Diet", "private"),
    ("when do we fly to Portugal?", "Lisbon trip", "private"),
    ("Alvarez", "Vet", "private"),
])
def test_paraphrased_query_finds_the_right_document_first(
        corpus: PersonalStore, query: str, title: str, privacy: str) -> None:
    for hybrid in (True, False):
        hits = search(corpus, query, k=2, hybrid=hybrid)
        assert hits, f"nothing found for {query!r}"
        assert hits[0].title == title and hits[0].privacy == privacy
        assert hits[0].chunk_index == 0 and hits[0].text
        assert all(-1.0 <= h.score <= 1.0 for h in hits)
        assert [h.score for h in hits] == sorted([h.score for h in hits], reverse=True) or hybrid


@pytest.mark.parametrize("query", ["write a function that reverses a list",
                                   "what is the capital of France"])
def test_unrelated_query_brings_no_private_chunk(corpus: PersonalStore, query: str) -> None:
    assert [h.title for h in search(corpus, query) if h.privacy == "private"] == []


@pytest.mark.parametrize("query", ['he said "hi', "AND OR NOT", "NEAR(vet cat, 2)", "text: x*",
                                   "^Alvarez", "(((", "   ", "日本語の質問"])
def test_user_text_with_fts_syntax_never_raises(corpus: PersonalStore, query: str) -> None:
    hits = search(corpus, query)
    assert isinstance(hits, list)


def test_hits_inject_into_messages(corpus: PersonalStore) -> None:
    hits = search(corpus, "Who is my cat's vet?", k=1)
    messages = inject_context(prompt_to_messages("Who is my cat's vet?"), hits)
    assert messages[0]["role"] == "system" and "Dr. Alvarez" in messages[0]["content"]
    assert "[1] Vet" in messages[0]["content"] and messages[1]["role"] == "user"


def test_delete_removes_chunks_vectors_and_fts_rows(store: PersonalStore) -> None:
    vet = store.add("Vet", VET, kind="note")
    other = store.add("Diet", DIET, kind="profile")
    assert search(store, "Dr. Alvarez")[0].doc_id == vet.id
    assert store.delete(vet.id) is True
    assert store.delete(vet.id) is False
    assert store.get(vet.id) is None and [d.id for d in store.list()] == [other.id]
    assert store.check_consistency() == []
    assert store.keyword_search('"alvarez"', 10) == []
    assert all(h.doc_id != vet.id for h in search(store, "Dr. Alvarez", min_score=-1.0))
    raw = sqlite3.connect(store.path)
    assert raw.execute("SELECT count(*) FROM chunks").fetchone()[0] == other.chunk_count
    assert raw.execute("SELECT count(*) FROM chunks_fts").fetchone()[0] == other.chunk_count
    raw.close()


def test_long_document_is_chunked_and_the_matching_chunk_is_found(store: PersonalStore) -> None:
    text = "\n\n".join(JOURNAL)
    info = store.add("Journal", text)
    assert info.chunk_count >= 3 and info.bytes == len(text.encode())
    assert store.chunk_rows(info.id) == info.chunk_count
    for query, needle in [("Who is the veterinarian of my cat?", "Dr. Alvarez"),
                          ("Dr. Alvarez", "Dr. Alvarez"),
                          ("when is the plumber coming to fix the faucet?", "Marek")]:
        hit = search(store, query, k=1)[0]
        assert needle in hit.text, (query, hit)
        assert 0 < hit.chunk_index < info.chunk_count - 1  # a chunk from the middle


def test_set_privacy_changes_the_label_on_hits(store: PersonalStore) -> None:
    info = store.add("Vet", VET, kind="note")
    assert info.privacy == "private"
    changed = store.set_privacy(info.id, "shareable")
    assert changed.privacy == "shareable" and changed.id == info.id
    assert search(store, "my cat's vet")[0].privacy == "shareable"
    with pytest.raises(NotFound):
        store.set_privacy("no-such-id", "private")
    with pytest.raises(ValueError, match="^privacy"):
        store.set_privacy(info.id, "public")


def test_wal_mode_and_schema_version(store: PersonalStore) -> None:
    store.add("Diet", DIET)
    raw = sqlite3.connect(store.path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    raw.close()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"text": ""}, "text"),
    ({"text": " \n\t "}, "text"),
    ({"text": "é" * (MAX_DOCUMENT_BYTES // 2 + 1)}, "text"),
    ({"kind": "diary"}, "kind"),
    ({"privacy": "public"}, "privacy"),
    ({"title": "t" * 1000}, "title"),
])
def test_validation_errors_name_the_field(store: PersonalStore, kwargs: dict[str, str],
                                          field: str) -> None:
    args = {"title": "T", "text": "some text"} | kwargs
    title, text = args.pop("title"), args.pop("text")
    with pytest.raises(ValueError, match=f"^{field}: ") as err:
        store.add(title, text, **args)
    assert isinstance(err.value, BadRequest) and err.value.field == field
    assert store.count() == 0 and store.check_consistency() == []


def test_store_reopens_from_disk_with_the_same_content(embedder: Embedder, tmp_path: Path
                                                       ) -> None:
    path = tmp_path / "nested" / "store.sqlite3"
    with PersonalStore(path, embedder) as first:
        first.add("Vet", VET, kind="note")
        first.add("Python decorators", DECORATORS, privacy="shareable", source="/docs/deco.md")
        before = first.list()
        hits_before = search(first, "pet doctor")
    with PersonalStore(path, embedder) as again:
        assert again.list() == before and again.count() == 2
        assert again.check_consistency() == []
        assert search(again, "pet doctor") == hits_before


def test_another_connection_sees_new_documents(embedder: Embedder, tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    with PersonalStore(path, embedder) as reader, PersonalStore(path, embedder) as writer:
        reader.add("Diet", DIET)
        assert search(reader, "Lisbon flight") == []  # builds the reader's vector cache
        writer.add("Lisbon trip", TRIP)
        assert search(reader, "Lisbon flight")[0].title == "Lisbon trip"


def test_concurrent_adds_and_searches_from_threads(store: PersonalStore) -> None:
    errors: list[BaseException] = []
    texts = [VET, DECORATORS, DIET, TRIP]

    def work(n: int) -> None:
        try:
            for i in range(2):
                store.add(f"doc {n}.{i}", texts[(n + i) % 4])
                search(store, "vegetarian food")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.count() == 8 and store.check_consistency() == []


def test_store_opens_without_a_model_for_listing_and_deleting(embedder: Embedder,
                                                              tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    with pytest.raises(ValueError, match="^embedder: "):
        PersonalStore(path, None)
    with PersonalStore(path, embedder) as full:
        keep = full.add("Diet", DIET)
        gone = full.add("Vet", VET)
    with PersonalStore(path, None) as bare:
        assert bare.dim == 384 and [d.id for d in bare.list()] == [keep.id, gone.id]
        assert bare.delete(gone.id) and bare.set_privacy(keep.id, "shareable").privacy
        assert bare.check_consistency() == []
        with pytest.raises(RuntimeError, match="without an embedder"):
            bare.add("x", "some text")
        with pytest.raises(RuntimeError, match="without an embedder"):
            search(bare, "diet")
    with PersonalStore(path, embedder) as full:
        assert [(h.title, h.privacy) for h in search(full, "vegetarian", k=4)] == [
            ("Diet", "shareable")]
