"""The HTTP calls the reward client, the fleet and the several-models place share: a msgpack POST to a /v1 route and
a JSON GET, each answering the domain error its status maps to (with the server's retry hint)."""

from __future__ import annotations

from typing import Any

from pickscore.errors import Unavailable
from pickscore.status import error_for_http


async def post_msgpack(
    session, url: str, fields: dict, headers: dict, ssl, timeout: float, server_name: str | None = None
) -> dict:
    """POST ``fields`` as msgpack to a /v1 route; the answer's fields, or the domain error its status maps to
    (with the server's retry hint), Unavailable when the server cannot be reached. ``server_name``: the name an
    https server's certificate is checked for (an address resolved from it)."""
    import aiohttp
    import msgpack

    headers = {**headers, "timeout": f"{max(timeout, 0.001):.3f}"}
    try:
        async with session.post(
            url,
            data=msgpack.packb(fields),
            headers=headers,
            ssl=ssl,
            timeout=aiohttp.ClientTimeout(total=timeout),
            **_named(url, server_name),
        ) as r:
            payload = msgpack.unpackb(await r.read()) if r.content_type == "application/msgpack" else {}
            if r.status == 200:
                return payload
            raise _error(r, url, payload)
    except aiohttp.ClientError as e:
        raise Unavailable(f"{url}: {type(e).__name__}: {e}") from e


async def get_json(
    session, url: str, query: dict, headers: dict, ssl, timeout: float = 30.0, server_name: str | None = None
) -> dict[str, Any]:
    """GET a /v1 route's JSON; its fields, or the domain error its status maps to, Unavailable when the server
    cannot be reached."""
    import aiohttp

    try:
        async with session.get(
            url,
            params=query,
            headers=headers,
            ssl=ssl,
            timeout=aiohttp.ClientTimeout(total=timeout),
            **_named(url, server_name),
        ) as r:
            payload = await r.json(content_type=None) if r.content_type == "application/json" else {}
            if r.status == 200:
                return payload
            raise _error(r, url, payload)
    except aiohttp.ClientError as e:
        raise Unavailable(f"{url}: {type(e).__name__}: {e}") from e


def _named(url: str, server_name: str | None) -> dict[str, str]:
    return {"server_hostname": server_name} if server_name and url.startswith("https://") else {}


def _error(r, url: str, payload: dict):
    hint = r.headers.get("retry-after-ms") or (
        str(float(r.headers["Retry-After"]) * 1000) if "Retry-After" in r.headers else None
    )
    message = f"server: HTTP {r.status}: {payload.get('error', r.reason)}"
    return error_for_http(r.status, message, None if hint is None else float(hint) / 1000)
