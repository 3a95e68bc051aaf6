"""``python -m fastapi_dbpool``: the diagnostics command (see :mod:`fastapi_dbpool.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
