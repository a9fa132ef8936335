//! The stand-alone sea-orm-migration CLI: `cargo run -p migration --features cli -- status`.
//! It reads DATABASE_URL; operators normally use `instructd migrate` instead.

#[tokio::main]
async fn main() {
    sea_orm_migration::cli::run_cli(migration::Migrator).await;
}
