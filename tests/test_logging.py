"""Logs: structured when asked, and free of what people said."""
from __future__ import annotations

import io
import json
import logging

import httpx

from agent.cli import setup_logging
from webrtc_client import Client

import numpy as np


def test_json_logs_carry_the_room_as_a_field():
    setup_logging("info", "json")
    stream = io.StringIO()
    root = logging.getLogger()
    root.handlers[0].setStream(stream)
    try:
        logging.LoggerAdapter(logging.getLogger("agent.room"), {"room": "r-42"}).info("turn=%d metrics x=1", 3)
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("pipeline").exception("failed")
    finally:
        setup_logging("warning")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["room"] == "r-42" and first["msg"] == "turn=3 metrics x=1" and first["level"] == "info"
    assert first["logger"] == "agent.room" and first["ts"].endswith("Z")
    assert second["room"] == "-" and "ValueError: boom" in second["exc"]


async def test_logs_hold_no_transcript_text_by_default(parley_server, caplog):
    secret_said, secret_replied = "my badge code is zebra-quartz", "zebra-quartz noted"
    parley_server.llm.reply_for = lambda body: (f"Thanks, {secret_replied}. What else would you like to add "
                                                "to that answer before we move on to the next question?")
    caplog.set_level(logging.INFO)
    client = Client(parley_server.url, np.zeros(1600, np.float32))
    await client.connect()
    try:
        await client.wait_for(lambda c: c.of("bot-ready"))
        client.send("send-text", {"content": f"Sure, {secret_said}."})
        await client.wait_for(lambda c: "What else" in c.bot_text())
        client.send("send-text", {"content": "Let me interrupt you there."})  # an interrupted reply is logged
        interrupted = await client.wait_for(lambda c: [m for m in c.of("server-message")
                                                       if m["data"].get("type") == "interrupted"])
        assert secret_replied in interrupted[0]["data"]["spoken_text"]
        async with httpx.AsyncClient(base_url=parley_server.url) as http:
            assert (await http.get(f"/api/rooms/{client.room}")).status_code == 200
    finally:
        await client.close()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "zebra" not in logged and "badge" not in logged and "interrupt you" not in logged
    assert f"room {client.room} opened" in logged  # the logs were captured, and they do name the room
