"""The shapes people use beyond the invoice example: a timestamp, an optional list, an enum
class, a nested model and an optional one, a pattern. `python3 shapes.py` prints
`shapes.schema.json` (pydantic 2.13), which `entities::tests` compares instructd's schema of the
same Rust model with.
"""

import datetime
import enum
import json
from typing import Optional

from pydantic import BaseModel, Field


class Color(str, enum.Enum):
    red = "red"
    green = "green"


class Address(BaseModel):
    city: str


class Event(BaseModel):
    at: datetime.datetime
    tags: Optional[list[str]] = None
    color: Color
    address: Address
    backup: Optional[Address] = None
    note: str = Field(pattern=r"^\S", max_length=5)


if __name__ == "__main__":
    print(json.dumps(Event.model_json_schema(), indent=2))
