//! The guarantees under real faults: the real `instructd` binary as a child process,
//! killed with SIGKILL, drained with SIGTERM, cut off from RabbitMQ and Postgres. These
//! tests restart the shared services, so they run alone, one at a time
//! (`scripts/test.sh`). Every wait is a bounded poll on rows or events.

use testkit as helpers;
mod support;

mod crashes;
mod faults;
mod logs;
mod outages;
mod scale;
