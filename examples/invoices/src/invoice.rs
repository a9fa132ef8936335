//! An invoice, generated from its text: the table, the schema the model is sent, and its
//! rules, declared once. The Python it is the equivalent of (`tests/pydantic/invoice.py`):
//!
//! ```python
//! class Invoice(SQLModel, table=True):
//!     id: SkipJsonSchema[UUID] = Field(default_factory=uuid4, primary_key=True)
//!     vendor: str = Field(min_length=1, description="Who issued the invoice")
//!     currency: Literal["EUR", "USD", "GBP"]
//!     issued_on: datetime.date
//!     due_on: Optional[datetime.date] = None
//!     total_cents: int = Field(ge=0)
//!     line_items: list[LineItem] = Field(min_length=1, max_length=50)
//! ```
//!
//! Doc comments stay Rust's (`#[instructd::model]`): what the model reads is in
//! `#[schemars(description = …)]`.

use instructd::{Generate, InsertFuture};
use sea_orm::entity::prelude::*;
use sea_orm::{DatabaseTransaction, IntoActiveModel};
use serde::{Deserialize, Serialize};

use crate::invoice_line;

#[instructd::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize, schemars::JsonSchema)]
#[sea_orm(table_name = "invoice")]
#[schemars(rename = "Invoice", transform = instructd::schema::pydantic_style)]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    #[serde(skip_deserializing, default = "Uuid::new_v4")]
    #[schemars(skip)]
    pub id: Uuid,
    #[sea_orm(column_type = "Text")]
    #[schemars(length(min = 1), description = "Who issued the invoice")]
    pub vendor: String,
    pub currency: Currency,
    pub issued_on: Date,
    pub due_on: Option<Date>,
    #[schemars(range(min = 0))]
    pub total_cents: i64,
    /// Not a column: the `invoice_line` rows stored with the invoice.
    #[sea_orm(ignore)]
    #[schemars(length(min = 1, max = 50))]
    pub line_items: Vec<invoice_line::Model>,
}

/// The currencies an invoice may be in: `Literal["EUR", "USD", "GBP"]`, a `text` column.
#[instructd::model]
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum, Serialize, Deserialize, schemars::JsonSchema,
)]
#[sea_orm(rs_type = "String", db_type = "Text", rename_all = "UPPERCASE")]
#[serde(rename_all = "UPPERCASE")]
#[schemars(inline)]
pub enum Currency {
    Eur,
    Usd,
    Gbp,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(has_many = "invoice_line::Entity")]
    Line,
}

impl Related<invoice_line::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Line.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}

impl Generate for Model {
    fn record_id(&self) -> Uuid {
        self.id
    }

    fn hydrate(&mut self) {
        for line in &mut self.line_items {
            line.invoice_id = self.id;
        }
    }

    /// The one rule a schema cannot say: the lines add up to the total.
    fn validate(&self) -> Result<(), String> {
        // In i128: 50 lines of i32 × i64 cannot overflow it, whatever the model wrote.
        let lines: i128 =
            self.line_items.iter().map(|line| i128::from(line.quantity) * i128::from(line.unit_price_cents)).sum();
        match lines - i128::from(self.total_cents) {
            0 => Ok(()),
            more if more > 0 => Err(format!(
                "total_cents: the line items add up to {lines}, {more} more than total_cents ({})",
                self.total_cents
            )),
            less => Err(format!(
                "total_cents: the line items add up to {lines}, {} less than total_cents ({})",
                -less, self.total_cents
            )),
        }
    }

    fn insert_children<'a>(&'a self, txn: &'a DatabaseTransaction) -> InsertFuture<'a> {
        Box::pin(async move {
            let lines = self.line_items.iter().map(|line| line.clone().into_active_model());
            invoice_line::Entity::insert_many(lines).exec_without_returning(txn).await?;
            Ok(())
        })
    }
}
