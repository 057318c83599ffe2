"""Streaming chat completions from any OpenAI-compatible server (OpenAI, vLLM, Ollama, ...)."""
from __future__ import annotations

import asyncio
import importlib
import json
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


class LLMError(RuntimeError):
    """The LLM could not produce a reply (after retries). The message is safe to show a user."""


class LLM(Protocol):
    def stream(self, messages: list[dict]) -> AsyncIterator[str]:
        """Yield the reply's text deltas. Raises LLMError."""


class StructuredLLM(Protocol):
    async def complete_json(self, messages: list[dict], schema: dict, name: str) -> str:
        """One non-streamed completion constrained to a JSON schema; the raw text (the caller
        validates it). Raises LLMError."""


@dataclass(frozen=True)
class LLMOptions:
    base_url: str | None = None
    api_key: str | None = None
    model: str = "gpt-4o-mini"
    temperature: float = 0.7
    max_tokens: int = 300  # spoken replies are short; this also bounds a runaway generation
    connect_timeout_s: float = 5.0
    first_token_timeout_s: float = 15.0
    token_timeout_s: float = 10.0  # longest silence between two deltas
    retries: int = 2
    backoff_s: float = 0.5


class OpenAILLM:
    def __init__(self, options: LLMOptions):
        import httpx
        from openai import AsyncOpenAI

        self.options = options
        # The SDK's own retries would hide attempts from our timeouts; we retry ourselves.
        self._client = AsyncOpenAI(
            base_url=options.base_url,
            api_key=options.api_key or "not-needed",
            max_retries=0,
            timeout=httpx.Timeout(options.first_token_timeout_s, connect=options.connect_timeout_s),
        )
        # The SDK imports its resource modules, and the HTTP stack its async backend, on first use:
        # ~40 ms with the event loop blocked, i.e. every room's voice late on the first turn after
        # start-up. Paid here instead, at start-up.
        self._client.chat.completions  # noqa: B018
        try:
            importlib.import_module("anyio._backends._asyncio")
        except ImportError:  # a later anyio laid out otherwise: only the first request is slower
            pass

    async def stream(self, messages: list[dict]) -> AsyncIterator[str]:
        import openai

        o = self.options
        last_error: Exception | None = None
        for attempt in range(o.retries + 1):
            if attempt:
                await asyncio.sleep(o.backoff_s * 2 ** (attempt - 1) * (0.75 + random.random() / 2))
            produced = False
            try:
                async with asyncio.timeout(o.first_token_timeout_s):
                    response = await self._client.chat.completions.create(
                        model=o.model, messages=messages, stream=True,
                        temperature=o.temperature, max_tokens=o.max_tokens,
                    )
                async with response:
                    it = response.__aiter__()
                    while True:
                        timeout = o.token_timeout_s if produced else o.first_token_timeout_s
                        try:
                            async with asyncio.timeout(timeout):
                                chunk = await it.__anext__()
                        except StopAsyncIteration:
                            return
                        if not chunk.choices:
                            continue
                        delta = chunk.choices[0].delta.content
                        if delta:
                            produced = True
                            yield delta
            except (TimeoutError, openai.APIError, OSError) as e:
                last_error = e
                if produced:
                    # Half a reply is already being spoken: repeating it would be worse than stopping.
                    raise LLMError(f"the language model stopped mid-reply ({_describe(e)})") from e
                if isinstance(e, openai.APIStatusError) and e.status_code in (400, 401, 403, 404):
                    break  # our request is wrong: retrying cannot help
                log.warning("llm attempt %d failed: %s", attempt + 1, _describe(e))
        raise LLMError(f"the language model is unavailable ({_describe(last_error)})")

    async def complete_json(self, messages: list[dict], schema: dict, name: str, timeout_s: float = 30.0) -> str:
        """Structured output. Servers without JSON-schema support (older vLLM, some proxies) reject
        ``json_schema`` with a 400: those get plain JSON mode, with the schema in the prompt."""
        import openai

        formats = [
            {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
            {"type": "json_object"},
        ]
        last: Exception | None = None
        for i, response_format in enumerate(formats):
            msgs = messages if i == 0 else [
                *messages, {"role": "system", "content": f"Answer with JSON matching this schema: {json.dumps(schema)}"}]
            try:
                async with asyncio.timeout(timeout_s):
                    response = await self._client.chat.completions.create(
                        model=self.options.model, messages=msgs, temperature=0.2, response_format=response_format)
                return response.choices[0].message.content or ""
            except openai.APIStatusError as e:
                last = e
                if e.status_code not in (400, 422):
                    break
            except (TimeoutError, openai.APIError, OSError) as e:
                last = e
                break
        raise LLMError(f"structured completion failed ({_describe(last)})")

    async def aclose(self) -> None:
        await self._client.close()


def _describe(e: Exception | None) -> str:
    import openai

    if isinstance(e, (TimeoutError, openai.APITimeoutError)):  # the latter is an APIConnectionError
        return "timed out"
    if isinstance(e, openai.APIStatusError):
        return f"HTTP {e.status_code}"
    if isinstance(e, openai.APIConnectionError):
        return "connection failed"
    return type(e).__name__ if e else "unknown error"
