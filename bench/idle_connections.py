#!/usr/bin/env python3
"""Idle keep-alive client connections and the gateway's memory (issue 12).

Opens N connections to the gateway, sends one request on each and reads its
answer, then leaves them all open and idle; reads the gateway's RSS before,
while they are open, and after they are closed (once the gateway's
tollgate_client_connections gauge is back to 0, then after SETTLE seconds).
Repeats for WAVES waves. Prints one line per measurement and a last line
`IDLE <before> <during1> <after1> ... <duringW> <afterW>` (MB) for bench/run.

  idle_connections.py --port P --admin A --pid PID [--n 10000] [--waves 3]
                      [--path /api/v1/eod/AAPL] [--header 'X-API-Key: k']
"""
import argparse
import socket
import sys
import time
import urllib.request


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def gauge(admin, name):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return float("nan")


def read_answer(s):
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError(f"closed before an answer: {data!r}")
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            continue
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(body) >= length:
            status = int(head.split()[1])
            if status != 200:
                raise RuntimeError(f"status {status}: {data!r}")
            return


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--admin", type=int, required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--waves", type=int, default=3)
    p.add_argument("--settle", type=float, default=2.0)
    p.add_argument("--path", default="/api/v1/eod/AAPL")
    p.add_argument("--header", action="append", default=[])
    a = p.parse_args()
    extra = "".join(h + "\r\n" for h in a.header)
    request = f"GET {a.path} HTTP/1.1\r\nHost: bench\r\n{extra}\r\n".encode()

    out = [rss_mb(a.pid)]
    print(f"before: {out[0]:.1f} MB", flush=True)
    for wave in range(1, a.waves + 1):
        t0 = time.monotonic()
        socks = []
        for _ in range(a.n):
            s = socket.create_connection(("127.0.0.1", a.port))
            s.sendall(request)
            socks.append(s)
        for s in socks:
            read_answer(s)
        opened = time.monotonic() - t0
        open_now = gauge(a.admin, "tollgate_client_connections")
        during = rss_mb(a.pid)
        print(f"wave {wave}: {a.n} connections open and idle ({opened:.1f} s to open), "
              f"gauge {open_now:.0f}, RSS {during:.1f} MB", flush=True)
        for s in socks:
            s.close()
        deadline = time.monotonic() + 30
        while gauge(a.admin, "tollgate_client_connections") > 0:
            if time.monotonic() > deadline:
                sys.exit("connections still open 30 s after closing")
            time.sleep(0.05)
        time.sleep(a.settle)
        after = rss_mb(a.pid)
        print(f"wave {wave}: closed, RSS {a.settle:.0f} s later {after:.1f} MB", flush=True)
        out += [during, after]
    print("IDLE " + " ".join(f"{x:.1f}" for x in out))


if __name__ == "__main__":
    main()
