"""Text in the reply path: LLM tokens grouped into speakable clauses, and the OpenAI-compatible client."""
from __future__ import annotations

import pytest

from fake_llm import Behaviour
from pipeline.conversation import llm_messages
from pipeline.llm import LLMError
from pipeline.sentences import SentenceAggregator
from pipeline_setup import llm


def chunked(text: str, size: int, **options) -> tuple[list[str], list[str]]:
    """Feed ``text`` in ``size``-character tokens; return what was cut while streaming, and the flush."""
    agg = SentenceAggregator(**options)
    out: list[str] = []
    for i in range(0, len(text), size):
        out += agg.push(text[i : i + size])
    return out, agg.flush()


@pytest.mark.parametrize("size", [1, 3, 1000])  # the cut must not depend on how tokens fall
def test_first_clause_is_cut_at_a_comma_once_long_enough(size):
    text = "Thanks for waiting, I had a look at your question, and here is my answer. Then more, and more."
    cut, rest = chunked(text, size)
    # "Thanks for waiting," is too short (19 chars) to be said alone; the next comma is past 24.
    assert cut == ["Thanks for waiting, I had a look at your question,", "and here is my answer."]
    assert rest == ["Then more, and more."]  # later clauses wait for a sentence end


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_sentence_ends_split_and_abbreviations_and_decimals_do_not(size):
    text = ("Dr. Smith said e.g. apples help. The price is 3.50 dollars, i.e. cheap! "
            "Mr. J. Doe agreed? I said no. Ask about room no. 5 instead… \"Really.\" Done")
    cut, rest = chunked(text, size)
    assert cut == ["Dr. Smith said e.g. apples help.", "The price is 3.50 dollars, i.e. cheap!",
                   "Mr. J. Doe agreed?", "I said no.", "Ask about room no. 5 instead…", "\"Really.\""]
    assert rest == ["Done"]


def test_a_sentence_longer_than_max_chars_is_cut_at_a_space():
    text = " ".join(f"word{i}" for i in range(80))  # 509 characters, no punctuation at all
    cut, rest = chunked(text, 7, max_chars=100)
    assert all(len(piece) <= 100 for piece in cut + rest) and len(cut) >= 4
    assert " ".join(cut + rest) == text  # nothing lost or split inside a word


def test_flush_returns_the_unfinished_tail_once():
    agg = SentenceAggregator()
    assert agg.push("Hello there. How are") == ["Hello there."]
    assert agg.flush() == ["How are"]
    assert agg.flush() == [] and agg.push("  ") == [] and agg.flush() == []


def test_llm_messages_strip_our_bookkeeping():
    history = [{"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello, I am", "interrupted": True}]
    assert llm_messages(history) == [{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello, I am"}]


MESSAGES = [{"role": "system", "content": "You are a test interviewer."},
            {"role": "user", "content": "Hello."},
            {"role": "assistant", "content": "Hi, tell me about"},
            {"role": "user", "content": "Sorry, go on."}]


async def collect(client, messages=MESSAGES) -> str:
    return "".join([d async for d in client.stream(messages)])


async def test_streams_the_reply_and_sends_exactly_the_messages(fake_llm):
    fake_llm.behaviour = Behaviour(reply="One two three. Four five.", chunk_words=2)
    client = llm(fake_llm.url, temperature=0.3, max_tokens=50)
    try:
        deltas = [d async for d in client.stream(MESSAGES)]
    finally:
        await client.aclose()
    assert "".join(deltas) == "One two three. Four five."
    assert len(deltas) == 3  # streamed as the server sent it, not buffered
    [body] = fake_llm.requests
    assert body["messages"] == MESSAGES
    assert body["model"] == "test-model" and body["stream"] is True
    assert body["temperature"] == 0.3 and body["max_tokens"] == 50


async def test_server_errors_are_retried_then_the_reply_comes(fake_llm):
    fake_llm.statuses = [500, 503]
    fake_llm.behaviour = Behaviour(reply="Third time lucky.")
    client = llm(fake_llm.url, retries=2, backoff_s=0.01)
    try:
        assert await collect(client) == "Third time lucky."
    finally:
        await client.aclose()
    assert len(fake_llm.requests) == 3
    assert all(r["messages"] == MESSAGES for r in fake_llm.requests)  # the same request each time


async def test_retries_run_out_with_a_clear_error(fake_llm):
    fake_llm.behaviour = Behaviour(status=502)
    client = llm(fake_llm.url, retries=1, backoff_s=0.01)
    try:
        with pytest.raises(LLMError, match=r"^the language model is unavailable \(HTTP 502\)$"):
            await collect(client)
    finally:
        await client.aclose()
    assert len(fake_llm.requests) == 2


@pytest.mark.parametrize("status", [400, 401, 404])
async def test_a_bad_request_is_not_retried(fake_llm, status):
    fake_llm.statuses = [status]  # a retry would succeed: it must not be attempted
    client = llm(fake_llm.url, retries=2, backoff_s=0.01)
    try:
        with pytest.raises(LLMError, match=f"HTTP {status}"):
            await collect(client)
    finally:
        await client.aclose()
    assert len(fake_llm.requests) == 1


async def test_a_stall_mid_reply_stops_without_repeating_it(fake_llm):
    # The first token comes at once, then the server stalls longer than token_timeout_s.
    fake_llm.behaviour = Behaviour(reply="I was saying that", token_delay_s=5.0)
    client = llm(fake_llm.url, token_timeout_s=0.3, retries=2)
    got: list[str] = []
    try:
        with pytest.raises(LLMError, match=r"stopped mid-reply \(timed out\)"):
            async for delta in client.stream(MESSAGES):
                got.append(delta)
    finally:
        await client.aclose()
    assert got == ["I "]  # what was already produced stands...
    assert len(fake_llm.requests) == 1  # ...and is not asked for (and spoken) again
