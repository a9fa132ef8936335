//! What a database error means for the work that hit it: wait for the database, or give up
//! on the data.

use sea_orm::{DbErr, RuntimeErr};

/// How a failed statement is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbFault {
    /// The database cannot be reached, or is restarting, or rolled the transaction back
    /// (deadlock, serialization): the same statement will succeed soon. Retried.
    Outage,
    /// The database answers but refuses the work: read-only (a standby after a failover),
    /// a missing table (`migrate_on_start = false` before migrating), no privilege, a wrong
    /// password. It lasts until an operator acts, so it is retried too, with backoff, and
    /// reported (`/readyz`, the logs); it never fails a job nor hot-loops a delivery.
    Refusal,
    /// The data cannot be stored (a constraint the schema did not express, a value out of
    /// range, a character the database's encoding lacks, a value over a size limit): the same
    /// statement fails forever. The job fails.
    Data,
}

/// Classifies `error` by its SQLSTATE class (or, without one, by what failed).
pub fn classify(error: &DbErr) -> DbFault {
    match error {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => DbFault::Outage,
        DbErr::Exec(RuntimeErr::SqlxError(error)) | DbErr::Query(RuntimeErr::SqlxError(error)) => {
            match error.as_ref() {
                sqlx::Error::Database(error) => match error.code() {
                    Some(code) => classify_sqlstate(&code),
                    None => DbFault::Refusal,
                },
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::BeginFailed => DbFault::Outage,
                _ => DbFault::Refusal,
            }
        }
        DbErr::Exec(RuntimeErr::Internal(_)) | DbErr::Query(RuntimeErr::Internal(_)) => DbFault::Outage,
        // Errors of instructd's own making (a row it cannot read back): not the data's fault,
        // and retrying with backoff is the safe side.
        _ => DbFault::Refusal,
    }
}

/// By SQLSTATE class: 08 connection exception, 40 transaction rollback, 53 insufficient
/// resources, 57 operator intervention (shutdown, cancel), 58 system error are outages;
/// 22 data exception, 23 integrity constraint violation and 54 program limit exceeded (an
/// index row or a value too large) are the data's fault; everything else (25006 read-only
/// transaction, 42P01 undefined table, 42501 insufficient privilege, 28P01 invalid password,
/// 3D000 no such database…) is a refusal.
pub fn classify_sqlstate(code: &str) -> DbFault {
    match code.get(..2) {
        Some("08" | "40" | "53" | "57" | "58") => DbFault::Outage,
        Some("22" | "23" | "54") => DbFault::Data,
        _ => DbFault::Refusal,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sea_orm::{ConnAcquireErr, DbErr, RuntimeErr};

    use super::*;

    fn sqlx(error: sqlx::Error) -> DbErr {
        DbErr::Exec(RuntimeErr::SqlxError(Arc::new(error)))
    }

    #[test]
    fn outages_refusals_and_faults_in_the_data_are_told_apart() {
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        for outage in [
            sqlx(sqlx::Error::Io(reset)),
            sqlx(sqlx::Error::PoolTimedOut),
            DbErr::ConnectionAcquire(ConnAcquireErr::Timeout),
            DbErr::Conn(RuntimeErr::Internal("gone".into())),
        ] {
            assert_eq!(classify(&outage), DbFault::Outage, "{outage}");
        }
        for refusal in
            [sqlx(sqlx::Error::ColumnNotFound("x".into())), DbErr::Json("bad".into()), DbErr::RecordNotInserted]
        {
            assert_eq!(classify(&refusal), DbFault::Refusal, "{refusal}");
        }
        for (code, fault) in [
            ("57P01", DbFault::Outage),
            ("40P01", DbFault::Outage),
            ("25006", DbFault::Refusal),
            ("42P01", DbFault::Refusal),
            ("42501", DbFault::Refusal),
            ("28P01", DbFault::Refusal),
            ("23505", DbFault::Data),
            ("22P05", DbFault::Data),
            ("54000", DbFault::Data),
        ] {
            assert_eq!(classify_sqlstate(code), fault, "{code}");
        }
    }
}
