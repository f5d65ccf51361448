//! I/O backends: they move bytes between sockets and sessions and nothing else.

pub mod epoll;
