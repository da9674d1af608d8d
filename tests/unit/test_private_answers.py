"""`orchestrator.private_answers`: which messages quote an answer drawn from private documents."""

from __future__ import annotations

import pytest

from orchestrator.private_answers import MIN_MATCH, PrivateAnswers

ANSWER = "Your secret codename is ZEBRAFROST; keep it to yourself."


def _msgs(*contents: str) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]


@pytest.fixture()
def answers() -> PrivateAnswers:
    a = PrivateAnswers()
    a.remember(ANSWER)
    a.remember("Yes.")
    return a


@pytest.mark.parametrize("content", [
    ANSWER,                                            # sent back as it was
    "  Your secret codename   is\nZEBRAFROST; keep it to yourself.  ",  # whitespace changed
    f"You told me: {ANSWER} Now what?",                # quoted inside a longer message
    ANSWER[:MIN_MATCH],                                # cut short at a stop sequence or a cancel
    "Yes.",                                            # a short answer, exactly
])
def test_a_message_quoting_a_remembered_answer_is_found(answers: PrivateAnswers, content: str) -> None:
    assert answers.found_in(_msgs("What is my codename?", content, "Write a haiku."))


@pytest.mark.parametrize("content", [
    ANSWER[:MIN_MATCH - 1],                            # too short a beginning to tell
    "Yes. I think so.",                                # a short answer inside other text: too common to tell
    "Your secret codename is something else entirely.",
    "",
])
def test_other_messages_are_not_found(answers: PrivateAnswers, content: str) -> None:
    assert not answers.found_in(_msgs("What is my codename?", content, "Write a haiku."))


def test_only_the_last_answers_are_kept_and_empty_ones_never() -> None:
    answers = PrivateAnswers(max_answers=2)
    answers.remember("   ")
    assert len(answers) == 0
    for i in range(3):
        answers.remember(f"answer number {i} drawn from a private note")
    assert len(answers) == 2
    assert not answers.found_in(_msgs("answer number 0 drawn from a private note"))
    assert answers.found_in(_msgs("answer number 2 drawn from a private note"))
