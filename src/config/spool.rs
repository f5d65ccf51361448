//! Where messages are stored: the spool directory and the sink choice.

use super::*;

settings_group! {
    // Where the spool is; shared by the server and the `spool` tools. No help heading
    // of its own: in the tools it would carry over to their own flags after it; in the
    // server's help it follows the "Sink and spool" group.
    pub struct SpoolDirSettings {
        /// The spool's directory.
        #[arg(long, value_name = "DIR", default_value = "./spool")]
        pub spool_dir: PathBuf,
    }
}

settings_group! {
    // The sink and the spool's limits.
    #[command(next_help_heading = "Sink and spool")]
    pub struct SpoolSettings {
        /// Where accepted messages go.
        #[arg(long, value_enum, default_value = "spool")]
        pub sink: SinkKind,
        /// With --sink kafka: store messages Kafka cannot take now in the spool
        /// (--spool-dir) and forward them when it can, instead of answering 451.
        #[arg(long)]
        pub spool_fallback: bool,
        /// Largest total size of the spool's segments; messages beyond it get 452
        /// 4.3.1; 0 for no limit.
        #[arg(long, value_name = "BYTES", default_value = "0")]
        pub spool_max_bytes: ByteSize,
        /// Free space to leave on the spool's file system; messages that would go below
        /// it get 452 4.3.1 before the disk fills; 0 turns it off. The default leaves
        /// room for a full batch and a maximal message.
        #[arg(long, value_name = "BYTES", default_value = "64M")]
        pub spool_min_free_bytes: ByteSize,
        /// Seal the segment being written once it holds this many bytes, so that
        /// `spool prune` and `spool export` can take it while the gateway runs.
        #[arg(long, value_name = "BYTES", default_value = "64M")]
        pub spool_segment_size: ByteSize,
        /// Seal the segment being written once its first record is this old, even
        /// when no more mail comes.
        #[arg(long, value_name = "DUR", default_value = "1h")]
        pub spool_segment_age: Dur,
        /// With --spool-fallback: spooled records in flight to Kafka at once, 1..=2000.
        /// The producer's queue keeps this much room for them beyond live traffic, so a
        /// backlog drains while mail keeps coming.
        #[arg(long, value_name = "N", default_value = "2000")]
        pub forward_window: u64,
    }
}
