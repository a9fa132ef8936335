//! The entities of the `instructd` binary: the SQLModel tutorial's `hero` and its `team`
//! (`entity::hero`, `entity::team`), with the migrations of their tables.

use crate::App;

/// The `instructd` binary's application: `hero` and `team`.
pub fn app() -> App {
    App::new()
        .entity::<entity::hero::Entity>("hero")
        .entity::<entity::team::Entity>("team")
        .migrations::<migration::Heroes>()
}
