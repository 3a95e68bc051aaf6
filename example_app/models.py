"""The example service's table: a catalogue of items, as a typed SQLAlchemy 2.0 model."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, DateTime, String, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """Declarative base of the example's tables."""


class Item(Base):
    """An item of the catalogue.

    ``touched_at`` is set by the background task of ``POST /items/{id}/touch``.
    """

    __tablename__ = "items"
    __table_args__ = (CheckConstraint("price_cents >= 0", name="items_price_not_negative"),)
    # Read created_at back with INSERT ... RETURNING, so a new item can be answered
    # without a second query.
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012 - read once, at mapping

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    price_cents: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    touched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
