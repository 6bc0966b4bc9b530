"""The load generator of `make chaos`: N keep-alive HTTP/1.1 clients in one asyncio loop, raw sockets.

A raw client costs a fraction of httpx's CPU per request, which matters on a
2-CPU machine where the server, the proxies and the clients share the cores.
Run in its own process by bench/chaos.py (``python bench/chaos_load.py SPEC OUT``),
so the proxies' thread in the harness never competes with it for a GIL.

SPEC (JSON): ``port``, ``clients``, ``start`` and ``stop`` (``time.monotonic()``
values: the clock is system-wide on Linux, so the harness and this process
agree), ``timeout`` (per request), ``requests`` (``[label, method, path,
headers, body]``), ``secrets`` (strings that must never appear in an answer),
``hosts`` (optional: ``[port, ...]`` to spread requests over several servers).
OUT gets one JSON document: ``samples`` as ``[label, t_send, t_recv, status,
took, retry_after, note, port, at, waited]`` (status 0: no answer; note: the error, or the
503/429 body's kind; took and at: the server's ``x-chaos-took`` and
``x-chaos-at``, None when absent; waited: its ``x-chaos-waited``, the DB gate's
wait for a connection, None outside the gate) and ``secret_hits``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

#: Read at most this much of a body (the example's answers are small).
MAX_BODY = 1 << 20


class Conn:
    """One keep-alive connection; reopened after any error."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await asyncio.wait_for(self.writer.wait_closed(), 1)
            except (OSError, TimeoutError):
                pass
        self.reader = self.writer = None

    async def request(self, raw: bytes) -> tuple[int, dict[bytes, bytes], bytes, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(raw)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            body = await self.reader.readexactly(min(int(headers[b"content-length"]), MAX_BODY))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(chunk[:-2])
            body = b"".join(parts)
        else:
            body = await self.reader.read(MAX_BODY)
            await self.close()
        if headers.get(b"connection", b"").lower() == b"close":
            await self.close()
        return status, headers, body, head


def encode(method: str, path: str, headers: dict[str, str], body: bytes | None, host: str) -> bytes:
    """One HTTP/1.1 request."""
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body is not None:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def kind_of(status: int, body: bytes) -> tuple[str, str | None]:
    """The ``error`` field of a JSON error body ('' when none, or 'not-json'), and what a 5xx says.

    The second part, for a 5xx only (the violations quote it): the body's
    ``detail``, or the checks a health report has down; else None. One parse
    for both: the load generator shares the CPUs with the server it measures.
    """
    if status < 400:
        return "", None
    try:
        doc = json.loads(body)
    except ValueError:
        return "not-json", None
    if not isinstance(doc, dict):
        return "not-json", None
    if "error" not in doc and "status" in doc:  # /health/deep's documented report
        checks = doc.get("checks")
        down = (
            "down: " + ",".join(sorted(k for k, v in checks.items() if v != "ok"))
            if status >= 500 and isinstance(checks, dict)
            else None
        )
        return f"health:{doc['status']}", down
    kind = str(doc.get("error", ""))
    detail = str(doc.get("detail", ""))
    said = detail[:120] if status >= 500 else None
    if kind == "dependency_unavailable":
        shed = "shed" if "capacity" in detail or "busy" in detail else ""
        return f"{kind}:{doc.get('dependency')}:{shed}", said
    return kind, said


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    ports = spec.get("hosts") or [spec["port"]]
    start, stop, timeout = spec["start"], spec["stop"], spec["timeout"]
    reqs = [
        (label, encode(method, path, headers, None if body is None else body.encode(), "chaos"))
        for label, method, path, headers, body in spec["requests"]
    ]
    secrets = [s.encode() for s in spec.get("secrets", ()) if s]
    samples: list[list[Any]] = []
    hits: list[str] = []
    delay = max(0.0, start - time.monotonic())
    await asyncio.sleep(delay)

    async def client(n: int) -> None:
        conns = {port: Conn(port) for port in ports}
        i = n
        while time.monotonic() < stop:
            label, raw = reqs[i % len(reqs)]
            port = ports[i % len(ports)]
            i += 1
            conn = conns[port]
            t0 = time.monotonic()
            try:
                status, headers, body, head = await asyncio.wait_for(conn.request(raw), timeout)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                await conn.close()
                error = type(exc).__name__
                samples.append([label, t0, time.monotonic(), 0, None, None, error, port] + [None] * 3)
                await asyncio.sleep(0.01)
                continue
            except TimeoutError:
                await conn.close()
                samples.append([label, t0, time.monotonic(), 0, None, None, "timeout", port] + [None] * 3)
                continue
            t1 = time.monotonic()
            kind, detail = kind_of(status, body)
            took = headers.get(b"x-chaos-took")
            at = headers.get(b"x-chaos-at")
            waited = headers.get(b"x-chaos-waited")
            retry = headers.get(b"retry-after")
            for secret in secrets:
                if secret in head or secret in body:
                    hits.append(f"{label}: {status} answer holds a secret")
            samples.append(
                [
                    label,
                    t0,
                    t1,
                    status,
                    float(took) if took else None,
                    retry.decode() if retry else None,
                    kind,
                    port,
                    float(at) if at else None,
                    float(waited) if waited else None,
                    detail,
                ]
            )
            if label == "POST /tracks" and status == 202:
                answer = json.loads(body)  # "outbox:<track id>": the harness matches it to its event
                samples[-1][6] = f"{answer.get('event', '')}:{answer.get('id', '')}"
        for conn in conns.values():
            await conn.close()

    await asyncio.gather(*(client(n) for n in range(spec["clients"])))
    return {"samples": samples, "secret_hits": hits}


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.loads(f.read())
    result = asyncio.run(run(spec))
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
