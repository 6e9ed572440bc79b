wrk.path = "/tail/x"
wrk.headers["X-API-Key"] = "bench-key"
