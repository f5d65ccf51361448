//! Fuzzes `Session::feed` differentially: the client stream fed whole and cut at
//! fuzzer-chosen points must give identical replies and messages (see `smtpgw_fuzz`
//! for the input format and the invariants checked along the way).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| smtpgw_fuzz::check(data));
