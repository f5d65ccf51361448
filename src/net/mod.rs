//! I/O backends: they move bytes between sockets and sessions and nothing else.
//!
//! `epoll` is the portable one; io_uring joins it in a later issue behind the same
//! start / drain / stop surface.

pub mod epoll;
pub mod probe;
pub mod uring;
