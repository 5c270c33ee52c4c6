"""aiohttp edge: WebSocket push, resume, HTTP API, auth and limits."""
