//! Reply texts (skeleton; the full table lands with the core).

/// Sent instead of the greeting when `--max-connections` is reached; then close.
pub fn too_many_connections(hostname: &str) -> String {
    format!("421 4.3.2 {hostname} Too many connections, try again later\r\n")
}
