//! The SQLModel tutorial's `Team`, generated with its heroes in one call: the model answers
//! one JSON object, and instructd stores a graph of rows — the team and each hero, linked by
//! `hero.team_id` — in one transaction. Every id is server-generated; `heroes` is not a column
//! (`sea_orm(ignore)`) but the list of `hero` rows inserted with the team.

use sea_orm::entity::prelude::*;
use sea_orm::{DatabaseTransaction, IntoActiveModel};
use serde::{Deserialize, Serialize};

use crate::hero;

/// A team: the `team` row, and the `Team` the model is sent.
#[instructd_macros::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize, schemars::JsonSchema)]
#[sea_orm(table_name = "team")]
#[schemars(rename = "Team", transform = crate::schema::pydantic_style)]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    #[serde(skip_deserializing, default = "Uuid::new_v4")]
    #[schemars(skip)]
    pub id: Uuid,
    #[sea_orm(column_type = "Text")]
    #[schemars(length(min = 1))]
    pub name: String,
    #[sea_orm(column_type = "Text")]
    pub headquarters: String,
    /// Not a column: the `hero` rows inserted with the team.
    #[sea_orm(ignore)]
    #[schemars(length(min = 1, max = 10))]
    pub heroes: Vec<hero::Model>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(has_many = "super::hero::Entity")]
    Hero,
}

impl Related<hero::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Hero.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}

impl crate::Generate for Model {
    fn record_id(&self) -> Uuid {
        self.id
    }

    /// Shows the model the age range a team's heroes must keep, in the team's own copy of
    /// the `Hero` definition (`instructd schema hero` stays the seed's).
    fn finish_schema(schema: &mut serde_json::Value) {
        if let Some(serde_json::Value::Object(integer)) = schema.pointer_mut("/$defs/Hero/properties/age/anyOf/0") {
            integer.insert("minimum".into(), (*hero::AGES.start()).into());
            integer.insert("maximum".into(), (*hero::AGES.end()).into());
        }
    }

    fn hydrate(&mut self) {
        for hero in &mut self.heroes {
            hero.team_id = Some(self.id);
        }
    }

    fn insert_children<'a>(&'a self, txn: &'a DatabaseTransaction) -> crate::InsertFuture<'a> {
        Box::pin(async move {
            let rows = self.heroes.iter().map(|hero| hero.clone().into_active_model());
            hero::Entity::insert_many(rows).exec_without_returning(txn).await?;
            Ok(())
        })
    }
}
