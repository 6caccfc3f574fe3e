"""The bounds every request is held to, refused in the server's JSON shape:
the length of its URL and header lines, and its deadline (app/deadlines.py):
server.request_timeout_ms, or less when the client asks for less with
X-Request-Timeout (milliseconds).

NOTE: meinheld refuses URLs and header lines of about 8 KiB and more with a
plain-HTML 400 before the app sees them; refusing from MAX_LINE_BYTES here
gives every client below that a JSON answer that says why.
"""
from __future__ import annotations

import falcon

from app import deadlines
from app.errors import HeaderTooLarge, InvalidHeader, UriTooLong

HEADER = "X-Request-Timeout"
MAX_LINE_BYTES = 4096


class RequestLimits:
    def __init__(self, request_timeout_ms: int):
        self.server_ms = request_timeout_ms  # 0: no server-wide deadline

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        env = req.env
        # PERF: the WSGI environ, not req.headers (a new dict) or get_header();
        # lengths first, which header only when one is too long.
        url = len(env.get("PATH_INFO", "")) + len(env.get("QUERY_STRING", ""))
        if url > MAX_LINE_BYTES:
            raise UriTooLong(f"the URL has {url} bytes; at most {MAX_LINE_BYTES} are accepted")
        for value in env.values():
            if type(value) is str and len(value) > MAX_LINE_BYTES:
                refuse_long_header(env)
        asked = env.get("HTTP_X_REQUEST_TIMEOUT")
        req.context.deadline = deadlines.start(self.budget_ms(asked)) if self.server_ms or asked is not None else None

    def budget_ms(self, asked: str | None) -> int:
        if asked is None:
            return self.server_ms
        # NOTE: isdigit() is also true of digits int() refuses (superscripts such as "²").
        if not (asked.strip().isascii() and asked.strip().isdigit()) or int(asked) < 1:
            raise InvalidHeader(f"{HEADER} must be a whole number of milliseconds >= 1, got {asked[:40]!r}")
        return min(int(asked), self.server_ms) if self.server_ms else int(asked)

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        token = req.context.get("deadline")
        if token is not None:
            deadlines.reset(token)


def refuse_long_header(env: dict) -> None:
    for key, value in env.items():
        if key[:5] in ("HTTP_", "CONTE") and type(value) is str and len(value) > MAX_LINE_BYTES:
            name = key[5:] if key[:5] == "HTTP_" else key
            raise HeaderTooLarge(f"header {name.replace('_', '-').title()} has {len(value)} bytes; "
                                 f"a header line may have at most {MAX_LINE_BYTES}")
