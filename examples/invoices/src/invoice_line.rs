//! A line of an invoice: `LineItem` in the schema the model is sent, an `invoice_line` row.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

#[instructd::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize, schemars::JsonSchema)]
#[sea_orm(table_name = "invoice_line")]
#[schemars(rename = "LineItem", transform = instructd::schema::pydantic_style)]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    #[serde(skip_deserializing, default = "Uuid::new_v4")]
    #[schemars(skip)]
    pub id: Uuid,
    /// The invoice it is a line of: set by the server, never by the model.
    #[sea_orm(indexed)]
    #[serde(skip_deserializing, default)]
    #[schemars(skip)]
    pub invoice_id: Uuid,
    #[sea_orm(column_type = "Text")]
    #[schemars(length(min = 1))]
    pub description: String,
    #[schemars(range(min = 1))]
    pub quantity: i32,
    #[schemars(range(min = 0))]
    pub unit_price_cents: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::invoice::Entity",
        from = "Column::InvoiceId",
        to = "super::invoice::Column::Id",
        on_delete = "Cascade"
    )]
    Invoice,
}

impl Related<super::invoice::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Invoice.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
