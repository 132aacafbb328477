"""A real MCP client (official Python SDK) calling tools through turnstile.

Usage: python3 client.py URL KEY SCENARIO
Prints one JSON object per line: {"step": ..., ...}. Exits 0 unless the
client itself broke; outcomes are for the caller to judge.
"""

import asyncio
import json
import sys

from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client

url, key, scenario = sys.argv[1], sys.argv[2], sys.argv[3]


def emit(**fields):
    print(json.dumps(fields), flush=True)


def outcome(result):
    text = " ".join(c.text for c in result.content if getattr(c, "type", "") == "text")
    return {"is_error": bool(result.isError), "text": text}


async def main():
    headers = {"Authorization": f"Bearer {key}"}
    logs = []

    async def on_log(params):
        logs.append(params.data)

    try:
        async with streamablehttp_client(url, headers=headers) as (read, write, session_id):
            async with ClientSession(read, write, logging_callback=on_log) as session:
                await session.initialize()
                emit(step="initialized", session=session_id())
                tools = await session.list_tools()
                emit(step="tools", names=sorted(t.name for t in tools.tools))
                if scenario == "kubeez":
                    emit(step="short_dialogue", **outcome(await session.call_tool("generate_dialogue", {"text": "hi"})))
                    for i in range(11):
                        r = await session.call_tool("generate_dialogue", {"text": f"hello number {i}"})
                        emit(step="dialogue", n=i, **outcome(r))
                    emit(step="balance", **outcome(await session.call_tool("get_balance", {})))
                    r = await session.call_tool("render_with_progress", {"steps": 3})
                    emit(step="progress", logs=logs, session=session_id(), **outcome(r))
                elif scenario == "kubeez_jobs":
                    for i in range(6):
                        r = await session.call_tool("generate_music", {"prompt": f"song {i}"})
                        emit(step="music", n=i, structured=r.structuredContent, **outcome(r))
                    r = await session.call_tool("get_music_status", {"generation_id": "music-1"})
                    emit(step="status", structured=r.structuredContent, **outcome(r))
                    r = await session.call_tool("generate_music", {"prompt": "one more"})
                    emit(step="music_after_done", structured=r.structuredContent, **outcome(r))
                elif scenario == "rfn":
                    emit(step="gated", **outcome(await session.call_tool("generate_content", {"topic": "shoes"})))
                    for i in range(70):
                        r = await session.call_tool("get_balance", {})
                        emit(step="balance", n=i, **outcome(r))
                        if r.isError:
                            break
    except Exception as e:  # noqa: BLE001 - report what the client saw
        emit(step="failed", error=repr(e), cause=repr(getattr(e, "exceptions", [e])))


asyncio.run(main())
