#!/usr/bin/env python3
"""Backends with a deterministic long tail, for bench/run's tail rows (issue 20).

    tail_origin.py --every 20 --fast-ms 5 --slow-ms 300 PORT [PORT ...]

Listens on each port (127.0.0.1) and answers GETs over keep-alive HTTP/1.1
with a fixed JSON body: on each port, every Nth request after --slow-ms, the
others after --fast-ms. The ports' counts start apart (port i at i*N/ports),
so that a request sent to all of them at once (race) does not meet the slow
turn of each: replicas whose tails come together cannot help each other. GET /_count answers {"requests": N}, the requests all
ports received so far (itself not counted), so the bench can tell how many
backend requests a row cost per client request.
"""

import argparse
import asyncio
import json

BODY = b'{"status": true, "data": {"symbol": "AAPL", "close": 185.64}}'
HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
)

total = 0


def serve(every, fast, slow, start):
    count = start

    async def conn(reader, writer):
        nonlocal count
        global total
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /_count "):
                    body = json.dumps({"requests": total}).encode()
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                        + str(len(body)).encode()
                        + b"\r\n\r\n"
                        + body
                    )
                    continue
                count += 1
                total += 1
                await asyncio.sleep(slow if count % every == 0 else fast)
                writer.write(HEAD + BODY)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    return conn


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--fast-ms", type=float, default=5)
    p.add_argument("--slow-ms", type=float, default=300)
    p.add_argument("ports", type=int, nargs="+")
    a = p.parse_args()
    servers = [
        await asyncio.start_server(
            serve(a.every, a.fast_ms / 1000, a.slow_ms / 1000, i * a.every // len(a.ports)),
            "127.0.0.1",
            port,
            backlog=1024,
        )
        for i, port in enumerate(a.ports)
    ]
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main())
