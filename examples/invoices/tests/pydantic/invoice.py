"""The Python model `invoices` is the equivalent of. `python3 invoice.py` prints its schema
(`invoice.schema.json`, from pydantic 2.13), which `invoices schema invoice` must equal.

`Invoice` is a SQLModel table in the original (`SQLModel, table=True`, `id` its primary key);
its JSON schema is pydantic's, so plain pydantic prints the same.
"""

import datetime
import json
from typing import Literal, Optional
from uuid import UUID, uuid4

from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema


class LineItem(BaseModel):
    description: str = Field(min_length=1)
    quantity: int = Field(ge=1)
    unit_price_cents: int = Field(ge=0)


class Invoice(BaseModel):
    id: SkipJsonSchema[UUID] = Field(default_factory=uuid4)
    vendor: str = Field(min_length=1, description="Who issued the invoice")
    currency: Literal["EUR", "USD", "GBP"]
    issued_on: datetime.date
    due_on: Optional[datetime.date] = None
    total_cents: int = Field(ge=0)
    line_items: list[LineItem] = Field(min_length=1, max_length=50)


if __name__ == "__main__":
    print(json.dumps(Invoice.model_json_schema(), indent=2))
