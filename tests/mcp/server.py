"""A real MCP server (official Python SDK, streamable HTTP) for turnstile's tests.

Usage: python3 server.py PORT [json]
(`json`: answer each request with one JSON response instead of an SSE stream)
Tools mirror seeds 000 and 003: generation tools, status tools, a tool that
streams progress, and generate_content (plan-gated in mcp-keys.toml).
"""

import sys

from mcp.server.fastmcp import Context, FastMCP

port = int(sys.argv[1])
json_response = len(sys.argv) > 2 and sys.argv[2] == "json"
server = FastMCP(
    "turnstile-test-upstream", host="127.0.0.1", port=port, log_level="WARNING", json_response=json_response
)


@server.tool()
def generate_dialogue(text: str) -> str:
    """Speak a dialogue."""
    return f"dialogue of {len(text)} characters queued"


@server.tool()
def generate_media(prompt: str) -> str:
    """Generate an image or a video."""
    return f"media for {prompt!r} queued"


music_jobs = {"next": 0}


@server.tool()
def generate_music(prompt: str) -> dict[str, str]:
    """Start a music generation: answers at once with its id (seed 000's asynchronous jobs)."""
    music_jobs["next"] += 1
    return {"generation_id": f"music-{music_jobs['next']}", "status": "queued"}


@server.tool()
def get_music_status(generation_id: str) -> dict[str, str]:
    """A generation's state: every job is complete by the time it is asked about."""
    return {"generation_id": generation_id, "status": "completed"}


@server.tool()
def get_balance() -> str:
    """Credits left."""
    return "42 credits"


@server.tool()
def generate_content(topic: str) -> str:
    """Write content (Autopilot plan)."""
    return f"content about {topic} queued"


@server.tool()
async def render_with_progress(steps: int, ctx: Context) -> str:
    """Sends progress messages on the SSE stream before the result."""
    for i in range(steps):
        await ctx.info(f"step {i + 1} of {steps}")
    return f"rendered in {steps} steps"


if __name__ == "__main__":
    server.run(transport="streamable-http")
