//! An instructd application with entities of its own: an `invoice` and its lines, generated
//! in one call and stored in one transaction (`invoice` and `invoice_line` rows).

pub mod invoice;
pub mod invoice_line;

use instructd::{App, CreateTable};
use sea_orm_migration::{MigrationTrait, MigratorTrait};

/// The application: requests naming `"entity": "invoice"`.
pub fn app() -> App {
    App::new().entity::<invoice::Entity>("invoice").migrations::<Migrator>()
}

/// The tables, created from the entities' declarations.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateTable::<invoice::Entity>::named("m20261201_000001_create_invoice")),
            Box::new(CreateTable::<invoice_line::Entity>::named("m20261201_000002_create_invoice_line")),
        ]
    }
}
