//! The `instructd` binary: the library's command line with the built-in entities, `hero`
//! and `team` (an application of your own is the same few lines: see the crate's docs).

fn main() -> std::process::ExitCode {
    instructd::heroes::app().main()
}
