use sea_orm_migration::prelude::*;

/// The SQLModel tutorial's `team`, and the nullable `hero.team_id` that links a hero to the
/// team it was generated with. Like `id`, the model never sees `team_id`.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared(
            "CREATE TABLE team (
                id uuid PRIMARY KEY,
                name text NOT NULL,
                headquarters text NOT NULL
            )",
        )
        .await?;
        db.execute_unprepared("ALTER TABLE hero ADD COLUMN team_id uuid NULL REFERENCES team (id) ON DELETE SET NULL")
            .await?;
        db.execute_unprepared("CREATE INDEX hero_team_idx ON hero (team_id)").await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared("ALTER TABLE hero DROP COLUMN team_id").await?;
        db.execute_unprepared("DROP TABLE team").await?;
        Ok(())
    }
}
