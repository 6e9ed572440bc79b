"""The original Python gateway that tollgate replaces, re-implemented as the
baseline row of bench/run. It is meant to be faithful, not good.

One FastAPI endpoint, GET /api/v1/{path}, behind an auth-and-rate-limit
decorator: `api_key` comes from the query string, the key's record is a Redis
hash, a call costs 1 credit. The answer is looked up in Redis under one key per
backend (backend URL + path), in backend order; on a miss the request goes to
every backend at once (httpx + asyncio.gather, 300 s timeout), the first answer
in list order whose JSON has "status": true is cached for an hour and returned,
and if there is none the developers are "emailed" and the caller gets a 404.

Flaws of the original kept on purpose, because they are what is measured:
  - a miss waits for the slowest backend (gather, not a race);
  - losing requests are never cancelled (they all run to the end anyway);
  - the credit is charged before the call and never refunded, even on a 404;
  - the cache key ignores the query string (?a=1 and ?a=2 share an entry);
  - API keys are stored in Redis in plain text, not hashed.

    BACKENDS=http://127.0.0.1:9001,http://127.0.0.1:9002 REDIS_URL=redis://127.0.0.1:6379/0 \\
        python bench/fastapi_gateway.py --host 127.0.0.1 --port 8000
    REDIS_URL=... python bench/fastapi_gateway.py --seed-key KEY --credits 1000000 --rate 1000000
"""
import argparse
import asyncio
import logging
import os
from contextlib import asynccontextmanager
from functools import wraps

import httpx
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

BACKENDS = [b.strip().rstrip("/") for b in os.environ.get("BACKENDS", "").split(",") if b.strip()]
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("CACHE_PREFIX", "")
CACHE_TTL = 3600
UNLIMITED_RATE = 10**12
NO_DATA = {"status": False, "message": "All API Servers failed to respond - "
           "Or there is no Data for the requested resource and parameters"}
log = logging.getLogger("fastapi_gateway")
clients = {}


@asynccontextmanager
async def lifespan(_app):
    clients["redis"] = aioredis.Redis(connection_pool=aioredis.ConnectionPool.from_url(REDIS_URL))
    # httpx's default pool (100 connections, 20 kept alive). Measured here, a
    # generous one (1000/1000) is slower, not faster: httpcore's pool scans its
    # connections for every request (encode/httpx#3215), and the miss path at
    # 32 wrk connections fell from ~250 to 50-180 req/s with it.
    clients["http"] = httpx.AsyncClient(timeout=300)
    yield
    await clients["http"].aclose()
    await clients["redis"].aclose()


app = FastAPI(lifespan=lifespan)


def error(status, message):
    return JSONResponse(status_code=status, content={"status": False, "message": message})


def auth_and_rate_limit(handler):
    @wraps(handler)
    async def wrapper(request: Request, path: str):
        r = clients["redis"]
        api_key = request.query_params.get("api_key")
        # The original kept the key itself in Redis, in plain text (no hashing).
        record_key = f"{PREFIX}apikey:{api_key}"
        credits, rate = await r.hmget(record_key, "credits", "rate_per_second") if api_key else (None, None)
        if credits is None:
            return error(401, "Invalid API key")
        if int(credits) <= 0:
            return error(402, "Insufficient credits")
        counter = f"{PREFIX}rate:{api_key}"  # a per-key counter living 1 s
        calls = await r.incr(counter)
        if calls == 1:
            await r.expire(counter, 1)
        if calls > int(rate or UNLIMITED_RATE):
            return error(429, "Rate limit exceeded")
        # Charged here, before the call: a 404 below is paid for all the same.
        await r.hincrby(record_key, "credits", -1)
        return await handler(request, path)
    return wrapper


def email_developers(subject, body):
    # The original sent an email to the developers here; the bench has no mail
    # server, so this only logs.
    log.warning("email to developers: %s: %s", subject, body)


@app.get("/api/v1/{path:path}")
@auth_and_rate_limit
async def api(request: Request, path: str):
    r = clients["redis"]
    # One cache key per backend, without the query string (the original's flaw).
    keys = [f"{PREFIX}{backend}/api/v1/{path}" for backend in BACKENDS]
    for key in keys:  # sequential GETs, as the original did
        cached = await r.get(key)
        if cached is not None:
            return Response(content=cached, media_type="application/json")
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "api_key"]
    http = clients["http"]
    answers = await asyncio.gather(  # waits for every backend, the slowest too
        *[http.get(f"{backend}/api/v1/{path}", params=params) for backend in BACKENDS],
        return_exceptions=True)
    for key, answer in zip(keys, answers):
        if isinstance(answer, BaseException):
            continue
        try:
            ok = answer.json().get("status") is True
        except (ValueError, AttributeError):
            continue
        if ok:
            await r.set(key, answer.content, ex=CACHE_TTL)  # SETEX
            return Response(content=answer.content, media_type="application/json")
    log.warning("all backends failed or had no data for /api/v1/%s", path)
    email_developers("API servers failed", f"/api/v1/{path} params={params}")
    return JSONResponse(status_code=404, content=NO_DATA)


def main():
    ap = argparse.ArgumentParser(description="The FastAPI original that tollgate replaces (bench baseline).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--seed-key", metavar="KEY", help="write KEY's record to REDIS_URL and exit")
    ap.add_argument("--credits", type=int, default=1_000_000)
    ap.add_argument("--rate", type=int, default=UNLIMITED_RATE, help="requests per second")
    args = ap.parse_args()
    if args.seed_key:
        import redis
        redis.Redis.from_url(REDIS_URL).hset(
            f"{PREFIX}apikey:{args.seed_key}", mapping={"credits": args.credits, "rate_per_second": args.rate})
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import uvicorn  # loop="auto"/http="auto" pick uvloop and httptools when installed
    uvicorn.run(app, host=args.host, port=args.port, workers=1, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
