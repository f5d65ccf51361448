//! The Kafka topic's size limit read again when the sink reconnects (issue 19 item 1),
//! against a tansu broker of the test's own behind a loopback proxy: tansu keeps its
//! topics in memory, so the proxy cuts every connection (an outage the gateway sees)
//! while the broker keeps the topic, which the test meanwhile recreated with another
//! `max.message.bytes` (tansu reports a topic's configuration in DescribeConfigs when
//! it was created with one, and does not implement AlterConfigs).
//!
//! With `--max-message-size auto` the SIZE new sessions advertise follows the topic
//! down and up again; without it SIZE stays, an error line and
//! `smtpgw_kafka_topic_too_small` say the topic is short, and a message the topic
//! cannot hold gets 451 rather than a bounce.

mod broker_support;
mod kafka_support;

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker_support::{tansu_binary, wait, Gw, Tansu};
use kafka_support::{lines_of, Client};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

const TOPIC: &str = "mail.sized";
const WAIT: Duration = Duration::from_secs(30);

/// A loopback TCP proxy to one port that can cut every connection it carries and
/// refuse new ones (accepted and closed at once) until reopened.
struct Proxy {
    port: u16,
    open: Arc<AtomicBool>,
    carried: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    /// Serves `listener` (bound first: the broker must advertise its port) to `to`.
    fn start(listener: TcpListener, to: u16) -> Proxy {
        let port = listener.local_addr().expect("proxy address").port();
        let open = Arc::new(AtomicBool::new(true));
        let carried = Arc::new(Mutex::new(Vec::new()));
        let (is_open, streams) = (Arc::clone(&open), Arc::clone(&carried));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !is_open.load(Ordering::Acquire) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                let pipe = |from: &TcpStream, to: &TcpStream| -> io::Result<()> {
                    let (mut from, mut to) = (from.try_clone()?, to.try_clone()?);
                    std::thread::spawn(move || {
                        let _ = io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                    Ok(())
                };
                if pipe(&client, &server).is_err() || pipe(&server, &client).is_err() {
                    continue;
                }
                streams.lock().expect("proxy").extend([client, server]);
            }
        });
        Proxy {
            port,
            open,
            carried,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Every connection dropped, new ones refused until [`Proxy::reopen`].
    fn cut(&self) {
        self.open.store(false, Ordering::Release);
        for s in self.carried.lock().expect("proxy").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn reopen(&self) {
        self.open.store(true, Ordering::Release);
    }
}

/// (Re)creates the topic with `max.message.bytes`. The gateway is idle meanwhile, so
/// nothing auto-creates the topic between the deletion and the creation.
fn recreate_topic(brokers: &str, max_message_bytes: usize) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    rt.block_on(async {
        // Absent the first time; tansu answers either way.
        let _ = admin.delete_topics(&[TOPIC], &opts).await;
        let limit = max_message_bytes.to_string();
        let topic =
            NewTopic::new(TOPIC, 1, TopicReplication::Fixed(1)).set("max.message.bytes", &limit);
        let created = admin
            .create_topics([&topic], &opts)
            .await
            .expect("create topics");
        assert!(
            created.iter().all(|r| r.is_ok()),
            "create {TOPIC}: {created:?}"
        );
    });
}

/// A broker behind a proxy with the topic at `max_message_bytes`; `None` without tansu.
fn broker(max_message_bytes: usize) -> Option<(Tansu, Proxy)> {
    let listener = TcpListener::bind("127.0.0.1:0").expect("proxy binds");
    let advertised = listener.local_addr().expect("proxy address").port();
    let mut tansu = Tansu::behind(tansu_binary()?, advertised);
    let proxy = Proxy::start(listener, tansu.port);
    tansu.start_empty();
    recreate_topic(&proxy.addr(), max_message_bytes);
    Some((tansu, proxy))
}

/// The SIZE a new session is offered.
fn advertised_size(gw: &Gw) -> usize {
    let mut c = Client::connect(&gw.smtp);
    c.cmd("EHLO client.test");
    let ehlo = c.cmd("EHLO client.test");
    ehlo.lines()
        .find_map(|l| l.strip_prefix("250-SIZE ").or(l.strip_prefix("250 SIZE ")))
        .unwrap_or_else(|| panic!("no SIZE in {ehlo:?}"))
        .trim()
        .parse()
        .expect("SIZE is a number")
}

/// Cuts the gateway off the broker until it says it is not ready, then lets it back.
fn outage(gw: &Gw, proxy: &Proxy) {
    proxy.cut();
    assert!(
        wait(WAIT, || gw.readyz() == 503),
        "the gateway never noticed the outage"
    );
    proxy.reopen();
    assert!(
        wait(WAIT, || gw.readyz() == 200),
        "the gateway never came back"
    );
}

#[test]
fn with_auto_size_follows_the_topic_limit_read_again_at_reconnection() {
    let Some((_tansu, proxy)) = broker(2_000_000) else {
        return;
    };
    let gw = Gw::start(
        &proxy.addr(),
        TOPIC,
        &["--reactors", "1", "--max-message-size", "auto"],
    );
    assert!(wait(WAIT, || gw.readyz() == 200), "never ready");
    let first = advertised_size(&gw);
    assert!(
        (1_800_000..2_000_000).contains(&first),
        "SIZE {first} for a 2,000,000-byte topic"
    );
    assert_eq!(gw.metric("smtpgw_max_message_size_bytes"), first as f64);
    assert_eq!(
        gw.metric("smtpgw_kafka_topic_max_message_bytes"),
        2_000_000.0
    );

    // The topic shrinks. Nothing tells the gateway until it reconnects.
    recreate_topic(&proxy.addr(), 600_000);
    assert_eq!(
        advertised_size(&gw),
        first,
        "read again without a reconnection"
    );
    outage(&gw, &proxy);
    assert!(
        wait(WAIT, || gw.metric("smtpgw_max_message_size_bytes")
            < 600_000.0),
        "SIZE did not follow the topic down: {}",
        gw.metric("smtpgw_max_message_size_bytes")
    );
    let smaller = advertised_size(&gw);
    assert!(
        (450_000..600_000).contains(&smaller),
        "SIZE {smaller} for a 600,000-byte topic"
    );
    assert_eq!(gw.metric("smtpgw_max_message_size_bytes"), smaller as f64);
    assert_eq!(gw.metric("smtpgw_kafka_topic_max_message_bytes"), 600_000.0);
    // The log writer batches: a line is out tens of milliseconds after its event.
    assert!(
        wait(WAIT, || !gw
            .log_lines("new sessions advertise SIZE")
            .is_empty()),
        "no warn line said SIZE changed"
    );
    // New sessions hold to it: the next message over it is refused at once, one
    // within it is published.
    let mut c = Client::connect(&gw.smtp);
    c.cmd("EHLO client.test");
    let over = c.send(&lines_of(smaller + 1));
    assert!(over.starts_with("552 5.3.4 "), "{over}");
    let within = c.send(&lines_of(smaller));
    assert!(within.starts_with("250 "), "{within}");

    // And grows again, back up to what 10M (auto's size) needs at most.
    recreate_topic(&proxy.addr(), 3_000_000);
    outage(&gw, &proxy);
    assert!(
        wait(WAIT, || gw.metric("smtpgw_max_message_size_bytes")
            > 2_000_000.0),
        "SIZE did not follow the topic up: {}",
        gw.metric("smtpgw_max_message_size_bytes")
    );
    let grown = advertised_size(&gw);
    assert!(
        (2_800_000..3_000_000).contains(&grown),
        "SIZE {grown} for a 3,000,000-byte topic"
    );
}

#[test]
fn without_auto_a_topic_shrunk_below_the_size_gets_451_and_an_error_not_bounces() {
    let Some((_tansu, proxy)) = broker(2_000_000) else {
        return;
    };
    let gw = Gw::start(
        &proxy.addr(),
        TOPIC,
        &["--reactors", "1", "--max-message-size", "1000000"],
    );
    assert!(wait(WAIT, || gw.readyz() == 200), "never ready");
    assert_eq!(advertised_size(&gw), 1_000_000);
    assert_eq!(gw.metric("smtpgw_kafka_topic_too_small"), 0.0);

    recreate_topic(&proxy.addr(), 600_000);
    outage(&gw, &proxy);
    assert!(
        wait(WAIT, || gw.metric("smtpgw_kafka_topic_too_small") == 1.0),
        "the short topic was not noticed"
    );
    let named =
        |l: &String| l.contains("ERROR") && l.contains("--max-message-size") && l.contains("451");
    assert!(
        wait(WAIT, || gw
            .log_lines("max.message.bytes=600000")
            .iter()
            .any(named)),
        "no error line naming both settings: {:?}",
        gw.log_lines("max.message.bytes=600000")
    );
    // SIZE stays what the operator set; a message the topic cannot hold is not
    // bounced but deferred (tansu itself would have taken it: the gateway decides).
    assert_eq!(advertised_size(&gw), 1_000_000);
    assert_eq!(gw.metric("smtpgw_max_message_size_bytes"), 1_000_000.0);
    let mut c = Client::connect(&gw.smtp);
    c.cmd("EHLO client.test");
    let deferred = c.send(&lines_of(800_000));
    assert!(deferred.starts_with("451 "), "{deferred}");
    let small = c.send(b"Subject: small\r\n\r\nfits\r\n");
    assert!(small.starts_with("250 "), "{small}");

    // The operator raises the topic: at the next reconnection the 451s stop.
    recreate_topic(&proxy.addr(), 2_000_000);
    outage(&gw, &proxy);
    assert!(
        wait(WAIT, || gw.metric("smtpgw_kafka_topic_too_small") == 0.0),
        "the raised topic was not noticed"
    );
    assert!(
        wait(WAIT, || !gw
            .log_lines("holds --max-message-size again")
            .is_empty()),
        "no line said the topic holds the size again"
    );
    let mut c = Client::connect(&gw.smtp);
    c.cmd("EHLO client.test");
    let taken = c.send(&lines_of(800_000));
    assert!(taken.starts_with("250 "), "{taken}");
}
