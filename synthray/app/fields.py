"""Bounded types for everything a client sends: path and query parameters, body fields.

Every value that reaches the database must fit what the database stores: ids and version
numbers are 32-bit integers on PostgreSQL (``Integer``), strings never hold NUL (PostgreSQL
refuses it in text), and nothing a client sends is unbounded. An out-of-range id is a 422
here, or a 404 from the lookup, never a driver error turned 500. ``tests/app/
test_bounds.py`` walks the OpenAPI document and fails on any parameter or body field
without a bound, so a new endpoint cannot forget these.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Query
from pydantic import BaseModel, Field, Strict, model_validator

from synthray.config import Choice as Choice  # the API takes what the setting takes

INT32_MAX = 2**31 - 1
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$"
ALIAS = r"^[a-z][a-z0-9_\-]{0,39}$"
NO_NUL = r"^[^\x00]*$"

# Path parameters.
RowId = Annotated[int, Path(ge=1, le=INT32_MAX, description="A row id.")]
VersionNo = Annotated[int, Path(ge=1, le=INT32_MAX, description="A version number.")]
NameParam = Annotated[str, Path(min_length=1, max_length=100, pattern=NAME)]
AliasParam = Annotated[str, Path(min_length=1, max_length=40, pattern=ALIAS)]
JobIdParam = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]
VersionQuery = Annotated[int, Query(ge=1, le=INT32_MAX, description="A version number.")]

# Body fields.
Name = Annotated[str, Field(min_length=1, max_length=100, pattern=NAME)]
# A JSON true or false only: in its default (lax) mode pydantic takes "0", "yes" or 1 for a
# bool, a request the OpenAPI document says is invalid (the schema fuzzer found "0").
# Numbers likewise: JSON numbers only (lax mode takes "5", true or 5.0 for an int, "1.5" or
# true for a float). Request schemas use pydantic's StrictInt and StrictFloat.
Flag = Annotated[bool, Strict()]
Id32 = Annotated[int, Strict(), Field(ge=1, le=INT32_MAX)]
Seed = Annotated[int, Strict(), Field(ge=0, le=INT32_MAX)]
Label = Annotated[str, Field(min_length=1, max_length=100)]
Column = Annotated[str, Field(min_length=1, max_length=200)]
RelPath = Annotated[str, Field(max_length=1024)]
MAX_CLASSES = 64
MAX_LABEL_MAP = 1000


def _nul_in(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_nul_in(k) or _nul_in(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_nul_in(v) for v in value)
    return False


class RequestModel(BaseModel):
    """Base of every request body: refuses a NUL character anywhere, keys included."""

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        if _nul_in(data):
            raise ValueError("text must not contain NUL characters")
        return data
