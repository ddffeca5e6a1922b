//! spawntrace's library: the data's walk from kernel events to explanations.
//!
//! [`record`] loads the probes and reads the ring buffer, [`trace`] is the on-disk format,
//! [`model`] rebuilds the process tree, [`report`] renders what it shows.
pub mod ansible;
pub mod compare;
pub mod model;
pub mod output;
pub mod record;
pub mod report;
pub mod trace;
