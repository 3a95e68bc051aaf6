"""``python -m example_app`` (``make run``): serve the example with uvicorn.

With ``DATABASE_URL`` set, the app uses that database. Without it, an embedded PostgreSQL
is started with its data under ``.dbpool-data/example-app`` (git-ignored, kept between
runs) and stopped again when the server exits (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

import uvicorn

from fastapi_dbpool.embedded import EmbeddedPostgres

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = PROJECT_ROOT / ".dbpool-data" / "example-app"

# The pool is sized from the server's max_connections; a small server keeps the
# embedded demo light.
EMBEDDED_MAX_CONNECTIONS = 30


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # uvicorn handles SIGTERM itself, shuts down, then re-raises it with the handler it
    # found: this one. Exiting through SystemExit runs the `finally` that stops PostgreSQL;
    # the default handler would kill the process on the spot and leave the server running.
    raise SystemExit(128 + signum)


def main() -> int:
    """Start the embedded database if needed, then serve until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)-9s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    embedded: EmbeddedPostgres | None = None
    try:
        if not os.environ.get("DATABASE_URL"):
            embedded = EmbeddedPostgres(DATA_DIR, max_connections=EMBEDDED_MAX_CONNECTIONS)
            embedded.start()
            url = embedded.url(driver="postgresql")
            os.environ["DATABASE_URL"] = url
            print(
                f"example_app: DATABASE_URL is not set, using an embedded PostgreSQL at {url} "
                f"(data in {DATA_DIR}, stopped on exit)",
                flush=True,
            )
        uvicorn.run(
            "example_app.main:app", host="127.0.0.1", port=int(os.environ.get("PORT", 8000))
        )
    except KeyboardInterrupt:
        return 130
    finally:
        if embedded is not None:
            embedded.stop()
            print("example_app: embedded PostgreSQL stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
