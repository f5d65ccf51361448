//! Message sizes and pre-built wire bytes.
//!
//! Everything a connection writes is built once before the run: per size, the command
//! batches with and without `SIZE=`, the dot-stuffed DATA body with its terminator and
//! the pipelined BDAT batch with the raw body appended. During the run a message costs
//! a pointer copy and one `write` per batch, so the client stays cheap next to the
//! server it measures.

use std::sync::Arc;

use anyhow::{bail, Context, Result};

/// One size of a `--size` distribution and its weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SizeWeight {
    pub bytes: usize,
    pub weight: u32,
}

/// Parses `1k`, `64k`, `1m`, `500` (octets), or a distribution `1k:70,10k:25,100k:4,1m:1`.
pub fn parse_sizes(spec: &str) -> Result<Vec<SizeWeight>> {
    let mut out = Vec::new();
    for part in spec.split(',') {
        let (size, weight) = match part.split_once(':') {
            Some((s, w)) => (s, w.trim().parse::<u32>().context("size weight")?),
            None => (part, 1),
        };
        if weight == 0 {
            continue;
        }
        out.push(SizeWeight {
            bytes: parse_size(size.trim())?,
            weight,
        });
    }
    if out.is_empty() {
        bail!("--size {spec:?} names no size with a positive weight");
    }
    Ok(out)
}

fn parse_size(s: &str) -> Result<usize> {
    let lower = s.to_ascii_lowercase();
    let (digits, unit) = match lower.as_bytes().last() {
        Some(b'k') => (&lower[..lower.len() - 1], 1024),
        Some(b'm') => (&lower[..lower.len() - 1], 1024 * 1024),
        _ => (&lower[..], 1),
    };
    let n: usize = digits
        .parse()
        .with_context(|| format!("bad size {s:?} (use e.g. 1k, 100k, 1m or octets)"))?;
    if n == 0 || n * unit > 64 * 1024 * 1024 {
        bail!("size {s:?} out of range (1 octet to 64m)");
    }
    Ok(n * unit)
}

/// Pre-built bytes for one message size.
pub struct Template {
    /// Message size in octets (the body as stored, after unstuffing).
    pub size: usize,
    /// `MAIL FROM` line, with and without `SIZE=` (index: server advertised SIZE).
    pub mail: [Vec<u8>; 2],
    /// One `RCPT TO` line per recipient.
    pub rcpts: Vec<Vec<u8>>,
    /// MAIL + RCPTs + DATA in one buffer, for pipelining (index as `mail`).
    pub data_batch: [Vec<u8>; 2],
    /// The body dot-stuffed and terminated by `.\r\n`, written after `354`.
    pub data_body: Vec<u8>,
    /// MAIL + RCPTs + `BDAT n LAST` + raw body, for pipelined CHUNKING (index as `mail`).
    pub bdat_batch: [Vec<u8>; 2],
    /// `BDAT n LAST` + raw body, for lock-step CHUNKING.
    pub bdat_chunk: Vec<u8>,
}

/// A tiny deterministic PRNG: the body's content must be repeatable, not random.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        XorShift(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Exactly `size` octets of a plausible message: headers, then text lines of 40 to 76
/// characters with CRLF, one line in 40 starting with a dot (so DATA needs stuffing).
pub fn raw_body(size: usize, seed: u64) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "the",
        "gateway",
        "accepts",
        "mail",
        "and",
        "stores",
        "it",
        "before",
        "saying",
        "two-fifty",
        "message",
        "spool",
        "reactor",
        "session",
        "Lorem",
        "ipsum",
        "dolor",
        "sit",
        "amet,",
        "consectetur",
        "adipiscing",
        "elit.",
        "=C3=A9t=C3=A9",
    ];
    let mut rng = XorShift::new(seed);
    let mut out = Vec::with_capacity(size + 80);
    out.extend_from_slice(
        format!(
            "From: Load Test <loadtest@client.example>\r\nTo: <user@example.com>\r\n\
             Subject: smtpgw-loadtest {size} octets\r\nMessage-ID: <{seed}.{size}@loadtest>\r\n\
             MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        )
        .as_bytes(),
    );
    while out.len() < size {
        let mut line = Vec::with_capacity(78);
        if rng.next_u64().is_multiple_of(40) {
            line.push(b'.');
        }
        let target = 40 + (rng.next_u64() % 37) as usize;
        while line.len() < target {
            let w = WORDS[(rng.next_u64() % WORDS.len() as u64) as usize].as_bytes();
            if line.len() + w.len() + 1 > 76 {
                break;
            }
            if !line.is_empty() {
                line.push(b' ');
            }
            line.extend_from_slice(w);
        }
        line.extend_from_slice(b"\r\n");
        out.extend_from_slice(&line);
    }
    // Cut to the exact size on a clean line end, so sizes are what the table says.
    out.truncate(size);
    if size >= 2 {
        out[size - 2] = b'\r';
        out[size - 1] = b'\n';
    }
    out
}

/// RFC 5321 section 4.5.2 transparency, and the terminator.
pub fn dot_stuff(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 40 + 8);
    let mut line_start = true;
    for &b in raw {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    if !line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

impl Template {
    pub fn new(size: usize, recipients: usize, domain: &str) -> Self {
        let raw = raw_body(size, size as u64);
        let mail = [
            b"MAIL FROM:<loadtest@client.example>\r\n".to_vec(),
            format!("MAIL FROM:<loadtest@client.example> SIZE={size}\r\n").into_bytes(),
        ];
        let rcpts: Vec<Vec<u8>> = (0..recipients)
            .map(|i| format!("RCPT TO:<user{i}@{domain}>\r\n").into_bytes())
            .collect();
        let envelope = |with_size: usize| {
            let mut v = mail[with_size].clone();
            rcpts.iter().for_each(|r| v.extend_from_slice(r));
            v
        };
        let mut bdat_chunk = format!("BDAT {} LAST\r\n", raw.len()).into_bytes();
        bdat_chunk.extend_from_slice(&raw);
        let data_batch = [0, 1].map(|s| {
            let mut v = envelope(s);
            v.extend_from_slice(b"DATA\r\n");
            v
        });
        let bdat_batch = [0, 1].map(|s| {
            let mut v = envelope(s);
            v.extend_from_slice(&bdat_chunk);
            v
        });
        Template {
            size,
            data_body: dot_stuff(&raw),
            mail,
            rcpts,
            data_batch,
            bdat_batch,
            bdat_chunk,
        }
    }
}

/// The templates of a distribution and a way to draw from it by weight.
pub struct Mix {
    pub templates: Vec<Arc<Template>>,
    /// Cumulative weights, same order as `templates`.
    cumulative: Vec<u64>,
}

impl Mix {
    pub fn new(sizes: &[SizeWeight], recipients: usize, domain: &str) -> Self {
        let mut total = 0;
        let mut cumulative = Vec::new();
        let mut templates = Vec::new();
        for s in sizes {
            total += u64::from(s.weight);
            cumulative.push(total);
            templates.push(Arc::new(Template::new(s.bytes, recipients, domain)));
        }
        Mix {
            templates,
            cumulative,
        }
    }

    pub fn pick(&self, rng: &mut XorShift) -> &Arc<Template> {
        let total = *self.cumulative.last().unwrap_or(&1);
        let r = rng.next_u64() % total;
        let i = self.cumulative.partition_point(|&c| c <= r);
        &self.templates[i.min(self.templates.len() - 1)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(
            parse_sizes("1k").unwrap(),
            vec![SizeWeight {
                bytes: 1024,
                weight: 1
            }]
        );
        let d = parse_sizes("1k:70,10k:25,100k:4,1m:1").unwrap();
        assert_eq!(d.len(), 4);
        assert_eq!(
            d[3],
            SizeWeight {
                bytes: 1 << 20,
                weight: 1
            }
        );
        assert!(parse_sizes("0").is_err());
        assert!(parse_sizes("1x").is_err());
    }

    #[test]
    fn bodies_have_exact_size_and_stuffing() {
        for size in [10, 1024, 100 * 1024] {
            let raw = raw_body(size, 3);
            assert_eq!(raw.len(), size);
            assert!(raw.ends_with(b"\r\n"));
            let stuffed = dot_stuff(&raw);
            assert!(stuffed.ends_with(b"\r\n.\r\n"));
            // Unstuffing gives the raw body back.
            let mut un = Vec::new();
            for line in stuffed[..stuffed.len() - 3].split_inclusive(|&b| b == b'\n') {
                un.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
            }
            assert_eq!(un, raw);
        }
    }

    #[test]
    fn mix_respects_weights() {
        let mix = Mix::new(&parse_sizes("1k:3,2k:1").unwrap(), 1, "example.com");
        let mut rng = XorShift::new(9);
        let small = (0..4000)
            .filter(|_| mix.pick(&mut rng).size == 1024)
            .count();
        assert!((2800..3200).contains(&small), "{small}");
    }
}
