"""The SDK's idempotency keys and document paging, without a server.

- Each logical `add_document` call carries its own idempotency key, fixed in the request (gRPC's
  retries re-send these bytes, so every attempt of one call has the same key).
- `Pages` asks for the next page while the server gives a token, stops at "", and refuses to loop
  on a server that hands back the token it was sent; a bad page_size fails before any call.
"""

from __future__ import annotations

import grpc
import pytest

from tandem_sdk import TandemError, _calls, _convert
from tandem_sdk._errors import FailedPrecondition, error_for


def test_each_add_document_call_has_its_own_fixed_key() -> None:
    ops = [_calls.add_document("text", title="t", kind="note", privacy="private", source="") for _ in range(3)]
    keys = [op.request.idempotency_key for op in ops]
    assert len(set(keys)) == 3 and all(len(k) == 32 and k.isalnum() for k in keys)
    assert ops[0].request.SerializeToString() == ops[0].request.SerializeToString()  # what a retry re-sends
    with pytest.raises(ValueError, match="^idempotency_key"):
        _convert.add_document_request("text", title="t", idempotency_key=3)  # type: ignore[arg-type]


def test_pages_follow_tokens_and_refuse_a_loop() -> None:
    pages = _calls.Pages(page_size=25)
    first = pages.first()
    assert (first.method, first.request.page_size, first.request.page_token) == ("ListDocuments", 25, "")
    second = pages.after(first, ([], "tok-1"))
    assert second is not None and second.request.page_token == "tok-1" and second.request.page_size == 25
    assert pages.after(second, ([], "")) is None
    with pytest.raises(TandemError) as info:
        pages.after(second, ([], "tok-1"))
    assert info.value.code == grpc.StatusCode.INTERNAL
    assert _calls.Pages(None).first().request.page_size == 0  # the server's default


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, 2**32])
def test_a_bad_page_size_is_refused_before_any_call(bad: object) -> None:
    with pytest.raises(ValueError, match="^page_size"):
        _calls.Pages(bad)  # type: ignore[arg-type]


def test_failed_precondition_has_its_own_class() -> None:
    err = error_for(grpc.StatusCode.FAILED_PRECONDITION, "idempotency_key: already used")
    assert isinstance(err, FailedPrecondition) and str(err).startswith("FAILED_PRECONDITION: ")
