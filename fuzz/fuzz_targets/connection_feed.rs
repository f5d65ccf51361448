//! Fuzzes the connection driver differentially: PROXY headers, the error budget, the
//! output cap and sink answers around `Session`, the stream fed whole and cut at
//! fuzzer-chosen points (see `smtpgw_fuzz::connection`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| smtpgw_fuzz::connection::check_connection(data));
