//! Talking to the model: the provider client with its one retry policy ([`client`],
//! [`retry`], [`limit`]), how the schema is sent and the answer read back in each mode ([`modes`],
//! [`tools`], [`strict`]), and the generate-validate-re-ask loop of a job ([`mod@generate`]).

pub mod circuit;
pub mod client;
pub mod generate;
pub mod limit;
pub mod modes;
pub mod providers;
pub mod retry;
pub mod strict;
pub mod tools;

pub use client::LlmClient;
pub use generate::{Generation, generate};
pub use providers::Providers;
