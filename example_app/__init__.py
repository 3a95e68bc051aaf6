"""A small item-catalogue service built on fastapi_dbpool's public API.

Run it with ``make run`` (or ``python -m example_app``); the FastAPI app is
``example_app.main:app``.
"""
