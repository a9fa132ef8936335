//! The seed's `Hero`: the `hero` table and, through `JsonSchema`, the schema the model is
//! sent. `id` is server-owned: hidden from the schema (`schemars(skip)`), ignored if the
//! model sends one anyway (`skip_deserializing`), and filled by `Uuid::new_v4`. So is
//! `team_id`, set only when the hero is generated as part of a team.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// A hero: the `hero` row, and the `Hero` the model is sent. Its doc comments are for Rust
/// readers (`#[instructd_macros::model]`): the schema must equal the seed's, which has no
/// description.
#[instructd_macros::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize, schemars::JsonSchema)]
#[sea_orm(table_name = "hero")]
#[schemars(rename = "Hero", transform = crate::schema::pydantic_style)]
pub struct Model {
    /// Server-owned: never in the schema, ignored in an answer, a new v4 UUID.
    #[sea_orm(primary_key, auto_increment = false)]
    #[serde(skip_deserializing, default = "Uuid::new_v4")]
    #[schemars(skip)]
    pub id: Uuid,
    #[sea_orm(column_type = "Text")]
    pub name: String,
    #[sea_orm(column_type = "Text")]
    pub secret_name: String,
    pub age: Option<i32>,
    /// The team the hero was generated with, if any: set by the server.
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub team_id: Option<Uuid>,
}

/// Ages a team's hero may have, when given. A hero generated alone is the seed's, which
/// accepts any age; its schema must stay the seed's, so the range is checked (and shown to
/// the model) only in a team.
pub const AGES: std::ops::RangeInclusive<i32> = 0..=150;

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::team::Entity",
        from = "Column::TeamId",
        to = "super::team::Column::Id",
        on_delete = "SetNull"
    )]
    Team,
}

impl Related<super::team::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Team.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}

impl crate::Generate for Model {
    fn record_id(&self) -> Uuid {
        self.id
    }
}
