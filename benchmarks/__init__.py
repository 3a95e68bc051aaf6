"""Side-by-side benchmarks of fastapi_dbpool against the plain FastAPI + SQLAlchemy pattern.

``python -m benchmarks`` (or ``make bench``) runs every comparison; see README.md. One
module per comparison, each with ``run(ctx) -> Report``:

* :mod:`benchmarks.http_throughput` - uvicorn + wrk, requests/s and latency;
* :mod:`benchmarks.overhead` - in-process (httpx ASGI transport), CPU per request;
* :mod:`benchmarks.checkout` - checkout latency, contention, connections in use;
* :mod:`benchmarks.burst` - 10,000 concurrent requests on a 10 + 10 pool;
* :mod:`benchmarks.memory` - memory per pooled connection;
* :mod:`benchmarks.features` - what each optional feature costs.

They are not tests: ``tests/integration/test_benchmarks_smoke.py`` only runs each one
with tiny sizes so that they cannot rot.
"""
