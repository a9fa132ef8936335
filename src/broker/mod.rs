//! RabbitMQ: connections ([`connection`]), the queues and exchange of the contract
//! ([`topology`]), consuming requests ([`consumer`]) and publishing with confirms
//! ([`publisher`]).

pub mod connection;
pub mod consumer;
pub mod publisher;
pub mod topology;

pub use publisher::{PublishError, Publisher};
