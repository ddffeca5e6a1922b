//! spawntrace's library: the data's walk from kernel events to explanations.
//!
//! [`record`] loads the probes and reads the ring buffer, [`trace`] is the on-disk format,
//! [`model`] rebuilds the process tree, [`ansible`] ties processes to Ansible's tasks,
//! [`analysis`] holds one analysed run, [`report`] renders it, [`compare`] sets runs side by side.
pub mod analysis;
pub mod ansible;
pub mod compare;
#[cfg(test)]
mod fixtures;
pub mod model;
pub mod output;
pub mod record;
pub mod report;
pub mod trace;
