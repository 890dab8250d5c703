//! Local PostgreSQL control for pgkeel.
//!
//! This crate owns everything the agent does to the postgres instance on its own machine:
//! finding the server binaries ([`binaries`]), running them as the unprivileged OS user when
//! the agent runs as root ([`user`]), the files pgkeel manages inside the data directory
//! ([`conf`], [`control::Instance::write_hba`]), the instance lifecycle — initdb, clone with
//! pg_basebackup, start, stop, promote ([`control`]) — and the SQL-level view of a running
//! server ([`probe`]). It knows nothing about the DCS or the HA decisions: the `pgkeel-ha`
//! crate decides, this crate executes.
//!
//! Small pure helpers live in [`lsn`] (LSN text form) and [`timeline`] (timeline history
//! files and "can this node follow that timeline" checks).

#![warn(missing_docs)]

pub mod binaries;
pub mod conf;
pub mod control;
mod error;
pub mod lsn;
pub mod ports;
pub mod probe;
pub mod process;
pub mod quote;
pub mod testing;
pub mod timeline;
pub mod user;

pub use binaries::PgBinaries;
pub use conf::ManagedConf;
pub use control::{ControlData, Instance, SourceConn, StopMode};
pub use error::{describe_sql_error, PgError};
pub use probe::{Probe, ReplicationRow, SlotRow, WalReceiver};
pub use user::RunAs;
