//! `invoices`: instructd's daemon and command line, generating invoices.

fn main() -> std::process::ExitCode {
    invoices::app().main()
}
