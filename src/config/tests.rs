use super::*;

/// clap reads `SMTPGW_*` while parsing; `parse_with_env` sets them under this lock,
/// and every parse here takes it. (Still a set_var in a multi-threaded test binary:
/// see tests/binary.rs for the way through the binary with an env map.)
static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Parses like the binary does, with sources recorded, under the ENV lock with the
/// given variables set for the duration.
fn parse_env(args: &[&str], env: &[(&str, &str)]) -> Result<Cli, clap::Error> {
    let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
    for (k, v) in env {
        std::env::set_var(k, v);
    }
    let parsed = parse_cli_from(std::iter::once("smtpgw").chain(args.iter().copied()));
    for (k, _) in env {
        std::env::remove_var(k);
    }
    parsed
}

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    parse_env(args, &[])
}

fn parse_with_env(args: &[&str], env: &[(&str, &str)]) -> Cli {
    parse_env(args, env).expect("parses")
}

fn cli(args: &[&str]) -> ServerArgs {
    let c = parse(args).expect("parses");
    assert!(c.command.is_none());
    c.server
}

/// The whole message of a command line clap refuses.
fn clap_err(args: &[&str], env: &[(&str, &str)]) -> String {
    parse_env(args, env)
        .expect_err("must not parse")
        .render()
        .to_string()
}

fn host() -> Option<String> {
    Some("mx.test".to_owned())
}

fn pairs(kafka: &KafkaSettings) -> Vec<(&str, &str)> {
    kafka
        .kafka_config
        .iter()
        .map(|s| (s.key.as_str(), s.value.as_str()))
        .collect()
}

fn file(text: &str) -> Result<ConfigFile, ConfigError> {
    ConfigFile::parse(text, Path::new("f.toml"))
}

fn run(args: &[&str], text: &str) -> Result<Config, ConfigError> {
    let f = file(text)?;
    resolve(cli(args), Some(&f), host)
}

fn err(args: &[&str], text: &str) -> String {
    run(args, text).expect_err("must fail").to_string()
}

#[test]
fn every_group_has_defaults_that_parse() {
    // `Default` is clap's parse of no arguments: a bad default_value panics here.
    assert_eq!(
        ServerSettings::default().listen,
        "127.0.0.1:2525".parse().unwrap()
    );
    assert_eq!(
        SessionSettings::default().max_message_size,
        MaxMessageSize {
            bytes: ByteSize(10 << 20),
            auto: false
        }
    );
    assert_eq!(
        LimitSettings::default().idle_timeout,
        Dur(Duration::from_secs(300))
    );
    assert_eq!(EdgeSettings::default().trusted_cidr.len(), 2);
    assert_eq!(
        SpoolDirSettings::default().spool_dir,
        PathBuf::from("./spool")
    );
    assert_eq!(
        SpoolSettings::default().spool_min_free_bytes,
        ByteSize(64 << 20)
    );
    assert_eq!(KafkaSettings::default().kafka_topic.0, "smtp.inbound");
    assert_eq!(LogSettings::default().log_format, LogFormat::Text);
}

/// `print-config` writes each value as text its parser reads back to the same value.
fn round_trips<G: Group + Serialize + PartialEq + std::fmt::Debug>(group: G) {
    let text = toml::to_string(&group).unwrap();
    let back: G = toml::from_str(&text).unwrap();
    assert_eq!(back, group, "{text}");
}

#[test]
fn printed_settings_read_back_as_the_same_values() {
    let a = cli(&[
        "--min-data-rate",
        "3K/7s",
        "--idle-timeout",
        "1500ms",
        "--max-message-size",
        "1.5M",
        "--proxy-trusted-cidr",
        "10.1.0.0/16,2001:db8::/32",
        "--bare-lf",
        "normalize",
        "--reactors",
        "3",
        "--max-body-memory",
        "1G",
        "--kafka-topic",
        "t.x",
        "--kafka-config",
        "linger.ms=5;compression.type=zstd",
        "--sink",
        "kafka",
        "--io-backend",
        "epoll",
        "--proxy-protocol",
        "v2",
        "--log-format",
        "json",
    ]);
    round_trips(a.server);
    round_trips(a.session);
    round_trips(a.limits);
    round_trips(a.edge);
    round_trips(a.store);
    round_trips(a.spool);
    round_trips(a.kafka);
    round_trips(a.log);
    round_trips(LimitSettings {
        min_data_rate: DataRate(None),
        ..LimitSettings::default()
    });
}

#[test]
fn printed_kafka_credentials_are_redacted() {
    let shown = |pair: &str| pair.parse::<KafkaSetting>().unwrap().to_string();
    assert_eq!(shown("sasl.password=hunter2"), "sasl.password=(redacted)");
    assert_eq!(shown("ssl.key.pem=-----BEGIN"), "ssl.key.pem=(redacted)");
    assert_eq!(
        shown("sasl.oauthbearer.client.secret=s"),
        "sasl.oauthbearer.client.secret=(redacted)"
    );
    assert_eq!(shown("linger.ms=5"), "linger.ms=5");
}

#[test]
fn every_setting_has_one_variable_and_one_file_key() {
    let cmd = command();
    let mut n = 0;
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if matches!(long, "help" | "version") {
            continue;
        }
        n += 1;
        let var = arg.get_env().map(|v| v.to_string_lossy().into_owned());
        assert_eq!(var, Some(env_var(long)), "{long}");
        if long != "config" {
            assert!(
                check_file_value(long, &toml::Value::String(String::new())).is_some(),
                "{long} is not a file key"
            );
        }
    }
    assert!(n > 40, "{n} settings");
    assert_eq!(env_var("log-level"), "SMTPGW_LOG");
    // The tools' own flags are not settings.
    let spool = cmd.find_subcommand("spool").unwrap();
    let replay = spool.find_subcommand("replay").unwrap();
    for arg in replay.get_arguments() {
        let long = arg.get_long().unwrap_or_default();
        let has_env = arg.get_env().is_some();
        let setting = matches!(long, "config" | "spool-dir")
            || long.contains("kafka") && long != "to-kafka"
            || long.contains("inflight")
            || long == "publish-timeout";
        assert_eq!(has_env, setting, "{long}");
    }
}

#[test]
fn edge_settings() {
    let c = run(&[], "").unwrap();
    assert_eq!(c.edge.max_connections_per_ip, 50);
    assert_eq!(c.edge.max_connections_per_prefix, 200);
    assert_eq!(c.edge.max_connection_rate_per_ip, 600);
    assert_eq!(c.edge.max_message_rate_per_ip, 0);
    assert_eq!(c.edge.error_budget, 20);
    assert_eq!(c.edge.greeting_delay, Dur(Duration::ZERO));
    assert_eq!(c.edge.tls_handshake_timeout, Dur(Duration::from_secs(10)));
    assert_eq!(c.edge.proxy_protocol, ProxyProtocol::Off);
    assert_eq!(c.edge.trusted_cidr.len(), 2);
    assert!(c.edge.tls().is_none());

    let c = run(
        &[
            "--max-connections-per-ip",
            "0",
            "--trusted-cidr",
            "10.0.0.0/8,192.0.2.1",
        ],
        "proxy-protocol = \"v2\"\nproxy-trusted-cidr = [\"10.1.0.0/16\"]\n\
         greeting-delay = \"2s\"\nmax-message-rate-per-ip = 30\n\
         tls-cert = \"c.pem\"\ntls-key = \"k.pem\"\nlisten-tls = \"127.0.0.1:465\"\n",
    )
    .unwrap();
    assert_eq!(c.edge.max_connections_per_ip, 0);
    assert_eq!(c.edge.trusted_cidr.len(), 2);
    assert_eq!(c.edge.proxy_protocol, ProxyProtocol::V2);
    assert_eq!(
        c.edge.proxy_trusted_cidr,
        vec![Cidr::parse("10.1.0.0/16").unwrap()]
    );
    assert_eq!(c.edge.greeting_delay, Dur(Duration::from_secs(2)));
    assert_eq!(c.edge.max_message_rate_per_ip, 30);
    assert_eq!(c.edge.listen_tls, Some("127.0.0.1:465".parse().unwrap()));
    assert!(c.edge.tls().is_some());
    assert_eq!(c.edge.proxy_listen, None);
    let c = run(
        &["--proxy-listen", "127.0.0.1:2526"],
        "proxy-protocol = \"v1\"\nproxy-trusted-cidr = \"10.0.0.0/8\"\n",
    )
    .unwrap();
    assert_eq!(c.edge.proxy_listen, Some("127.0.0.1:2526".parse().unwrap()));

    for (args, flag) in [
        (&["--proxy-protocol", "v1"][..], "--proxy-trusted-cidr:"),
        (&["--listen-tls", "127.0.0.1:465"][..], "--listen-tls:"),
        (&["--require-tls"][..], "--require-tls:"),
        (&["--tls-cert", "c.pem"][..], "--tls-key:"),
        (&["--tls-key", "k.pem"][..], "--tls-cert:"),
        (&["--greeting-delay", "2m"][..], "--greeting-delay:"),
        (
            &["--tls-handshake-timeout", "0"][..],
            "--tls-handshake-timeout:",
        ),
        (
            &["--proxy-listen", "127.0.0.1:2526"][..],
            "--proxy-listen: needs",
        ),
        (
            &[
                "--proxy-protocol",
                "v2",
                "--proxy-trusted-cidr",
                "10.0.0.0/8",
                "--proxy-listen",
                "127.0.0.1:2525",
            ][..],
            "--proxy-listen: must differ",
        ),
    ] {
        let e = err(args, "");
        assert!(e.starts_with(flag), "{args:?}: {e}");
    }
    // Values that do not parse are clap's to report, whole, naming the flag.
    for (args, flag) in [
        (
            &["--proxy-trusted-cidr", "10.0.0.0/33"][..],
            "--proxy-trusted-cidr",
        ),
        (&["--trusted-cidr", "nope"][..], "--trusted-cidr"),
        (&["--listen-tls", "x"][..], "--listen-tls"),
    ] {
        let e = clap_err(args, &[]);
        let first = e.lines().next().unwrap();
        assert!(first.starts_with("error:") && first.contains(flag), "{e}");
    }
}

#[test]
fn defaults() {
    let c = run(&[], "").unwrap();
    assert_eq!(c.server.listen, "127.0.0.1:2525".parse().unwrap());
    assert_eq!(c.hostname, "mx.test");
    assert_eq!(c.accept_domains, ["localhost", "mx.test"]);
    assert!(c.accept_domains_defaulted);
    assert_eq!(c.spool.sink, SinkKind::Spool);
    assert_eq!(c.store.spool_dir, PathBuf::from("./spool"));
    assert!(c.reactors >= 1);
    assert_eq!(c.max_message_size(), 10 * 1024 * 1024);
    assert_eq!(c.max_recipients(), 100);
    assert_eq!(c.limits.max_connections, 10_000);
    assert_eq!(c.limits.idle_timeout.0, Duration::from_secs(300));
    assert_eq!(c.limits.max_session_time.0, Duration::from_secs(3600));
    assert_eq!(c.limits.drain_timeout.0, Duration::from_secs(30));
    assert_eq!(
        c.limits.min_data_rate,
        DataRate(Some((1024, Duration::from_secs(30))))
    );
    assert_eq!(c.session.bare_lf, BareLfPolicy::Reject);
    assert_eq!(c.log.log_format, LogFormat::Text);
    assert_eq!(c.spool.spool_max_bytes, ByteSize(0));
    // The help shows each default once, from the field that declares it.
    let help = command().render_long_help().to_string();
    assert!(help.contains("[default: 10M]"), "{help}");
    assert!(help.contains("[env: SMTPGW_MAX_MESSAGE_SIZE=]"), "{help}");
}

#[test]
fn hostname_falls_back_to_localhost() {
    let c = resolve(cli(&[]), None, || None).unwrap();
    assert_eq!(c.hostname, "localhost");
    assert_eq!(c.accept_domains, ["localhost"]);
}

#[test]
fn cli_beats_file_beats_default() {
    let text = r#"
        listen = "[::1]:0"
        hostname = "file.example"
        accept-domain = ["A.example", "b.example"]
        reactors = 3
        max-message-size = "2M"
        idle-timeout = "5m"
        drain-timeout = 0
        sink = "null"
        bare-lf = "normalize"
    "#;
    let c = run(&["--reactors", "2", "--accept-domain", "c.EXAMPLE"], text).unwrap();
    assert_eq!(c.server.listen, "[::1]:0".parse().unwrap());
    assert_eq!(c.hostname, "file.example");
    assert_eq!(c.accept_domains, ["c.example"]);
    assert!(!c.accept_domains_defaulted);
    assert_eq!(c.reactors, 2);
    assert_eq!(c.max_message_size(), 2 << 20);
    assert_eq!(c.limits.idle_timeout.0, Duration::from_secs(300));
    assert_eq!(c.limits.drain_timeout.0, Duration::ZERO);
    assert_eq!(c.spool.sink, SinkKind::Null);
    assert_eq!(c.session.bare_lf, BareLfPolicy::Normalize);
    // A flag given with the default's value still beats the file.
    let c = run(&["--sink", "spool", "--drain-timeout", "30s"], text).unwrap();
    assert_eq!(c.spool.sink, SinkKind::Spool);
    assert_eq!(c.limits.drain_timeout.0, Duration::from_secs(30));

    let c = run(&[], text).unwrap();
    assert_eq!(c.reactors, 3);
    assert_eq!(c.accept_domains, ["a.example", "b.example"]);
}

#[test]
fn flag_beats_environment_beats_file_beats_default() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, "max-recipients = 7\nidle-timeout = \"7s\"\n").unwrap();
    let p = path.to_str().unwrap();
    let resolved = |args: &[&str], env: &[(&str, &str)]| {
        let mut all = vec!["--config", p];
        all.extend_from_slice(args);
        parse_with_env(&all, env).server.resolve().unwrap()
    };
    let c = resolved(&[], &[]);
    assert_eq!(
        (c.max_recipients(), c.limits.idle_timeout.0.as_secs()),
        (7, 7)
    );
    assert_eq!(c.limits.max_connections, 10_000, "default");
    let env = [
        ("SMTPGW_MAX_RECIPIENTS", "8"),
        ("SMTPGW_MAX_CONNECTIONS", "9"),
    ];
    let c = resolved(&[], &env);
    assert_eq!(
        (c.max_recipients(), c.limits.idle_timeout.0.as_secs()),
        (8, 7)
    );
    assert_eq!(c.limits.max_connections, 9);
    let c = resolved(&["--max-recipients", "10", "--idle-timeout", "10"], &env);
    assert_eq!(
        (c.max_recipients(), c.limits.idle_timeout.0.as_secs()),
        (10, 10)
    );
    // The file named by the environment counts like --config.
    let c = parse_with_env(&[], &[("SMTPGW_CONFIG", p)])
        .server
        .resolve()
        .unwrap();
    assert_eq!(c.max_recipients(), 7);
}

#[test]
fn accept_domain_repeats_and_commas() {
    let c = run(
        &[
            "--accept-domain",
            "a.example,B.example",
            "--accept-domain",
            "a.example",
        ],
        "",
    )
    .unwrap();
    assert_eq!(c.accept_domains, ["a.example", "b.example"]);
    let c = run(&[], "accept-domain = \"x.example\"").unwrap();
    assert_eq!(c.accept_domains, ["x.example"]);
}

#[test]
fn accept_domains_are_normalised_with_uts46_and_literals_are_taken() {
    let c = run(
        &[
            "--accept-domain",
            "Bücher.example,xn--BCHER-kva.example,[192.0.2.1],[IPv6:2001:DB8:0::1]",
        ],
        "",
    )
    .unwrap();
    assert_eq!(
        c.accept_domains,
        ["xn--bcher-kva.example", "[192.0.2.1]", "[IPv6:2001:db8::1]"]
    );
    for bad in ["[300.1.1.1]", "[x-tag:abc]", "[192.0.2.1", "a/b.example"] {
        let e = err(&["--accept-domain", bad], "");
        assert!(e.starts_with("--accept-domain: not a valid"), "{bad}: {e}");
    }
}

#[test]
fn no_open_relay() {
    assert!(err(&["--accept-domain", "*"], "").starts_with("--accept-domain: wildcards"));
    assert!(err(&["--accept-domain", "*.example"], "").starts_with("--accept-domain:"));
    assert!(err(&["--accept-domain", "a b"], "").starts_with("--accept-domain:"));
    assert!(err(&["--accept-domain", "a..b"], "").starts_with("--accept-domain:"));
    assert!(err(&["--accept-domain", ""], "").starts_with("--accept-domain: empty"));
    assert_eq!(
        err(&[], "accept-domain = [\"\"]"),
        "--config f.toml: `accept-domain`: empty domain; there is no way to accept every domain"
    );
    assert_eq!(
        err(&[], "accept-domain = []"),
        "--config f.toml: `accept-domain`: empty list; leave it out to accept only localhost and --hostname"
    );
}

#[test]
fn one_line_errors_name_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--spool-segment-size", "0"],
            "--spool-segment-size: must be at least 1 (got 0)",
        ),
        (
            &["--spool-segment-age", "0"],
            "--spool-segment-age: must be between 1s and 366d (got 0s)",
        ),
        (
            &["--reactors", "0"],
            "--reactors: must be between 1 and 1024 (got 0)",
        ),
        (
            &["--reactors", "1025"],
            "--reactors: must be between 1 and 1024 (got 1025)",
        ),
        (
            &["--max-recipients", "0"],
            "--max-recipients: must be at least 1 (got 0)",
        ),
        (
            &["--max-connections", "0"],
            "--max-connections: must be at least 1 (got 0)",
        ),
        (
            &["--max-message-size", "0"],
            "--max-message-size: must be between 1 and 1G (got 0)",
        ),
        (
            &["--max-message-size", "2G"],
            "--max-message-size: must be between 1 and 1G (got 2147483648)",
        ),
        (
            &["--max-body-memory", "1M"],
            "--max-body-memory: must be at least --max-message-size (10485760) (got 1048576)",
        ),
        (
            &["--idle-timeout", "0"],
            "--idle-timeout: must be between 1s and 366d (got 0s)",
        ),
        (
            &["--max-session-time", "400d"],
            "--max-session-time: must be between 1s and 366d (got 34560000s)",
        ),
        (
            &["--hostname", "bad\r\nname"],
            "--hostname: not a valid host name (got \"bad\\r\\nname\"); use letters, digits, '-' and '.'",
        ),
    ];
    for (args, want) in cases {
        let got = err(args, "");
        assert_eq!(&got, want, "for {args:?}");
        assert!(!got.contains('\n'));
    }
    // What does not parse at all is clap's whole message, naming the flag first.
    for (args, words) in [
        (
            &["--max-message-size", "10X"][..],
            "not a size (got \"10X\")",
        ),
        (
            &["--idle-timeout", "soon"][..],
            "not a duration (got \"soon\")",
        ),
        (
            &["--listen", "localhost"][..],
            "not an IP:PORT address (got \"localhost\")",
        ),
        (
            &["--metrics-listen", "localhost:9025"][..],
            "not an IP:PORT address",
        ),
    ] {
        let e = clap_err(args, &[]);
        let first = e.lines().next().unwrap();
        assert!(
            first.starts_with("error:") && first.contains(args[0]),
            "{e}"
        );
        assert!(first.contains(words), "{e}");
        assert!(e.contains("--help"), "{e}");
    }
}

#[test]
fn sizes_and_durations() {
    let s = |x: &str| x.parse::<ByteSize>().map(|b| b.0);
    assert_eq!(s("10485760"), Ok(10485760));
    // A single letter is a power of 1024, as the gateway always read it.
    assert_eq!(s("512K"), Ok(512 * 1024));
    assert_eq!(s("10m"), Ok(10 << 20));
    assert_eq!(s("10M"), Ok(10 << 20));
    assert_eq!(s("1G"), Ok(1 << 30));
    // IEC units are powers of 1024, SI units powers of 1000: never the same.
    assert_eq!(s("10MiB"), Ok(10 << 20));
    assert_eq!(s("10 MiB"), Ok(10 << 20));
    assert_eq!(s("10MB"), Ok(10_000_000));
    assert_eq!(s("10mb"), Ok(10_000_000));
    assert_eq!(s("1GiB"), Ok(1 << 30));
    assert_eq!(s("1GB"), Ok(1_000_000_000));
    assert_eq!(s("64kB"), Ok(64_000));
    assert_eq!(s("64KiB"), Ok(65_536));
    assert_eq!(s("1.5K"), Ok(1536));
    assert_eq!(s("7b"), Ok(7));
    for bad in [
        "",
        "-1",
        "10X",
        "M",
        "10 MiBs",
        "1.5",
        "99999999999999999999G",
    ] {
        assert!(s(bad).is_err(), "{bad:?}");
    }
    assert_eq!(
        s("10X"),
        Err(
            "not a size (got \"10X\"); e.g. 10485760, 512K, 10M (= 10MiB), 10MB (= 10000000)"
                .into()
        )
    );
    let d = |x: &str| x.parse::<Dur>().map(|d| d.0);
    assert_eq!(d("300"), Ok(Duration::from_secs(300)));
    assert_eq!(d("5m"), Ok(Duration::from_secs(300)));
    assert_eq!(d("1h 30m"), Ok(Duration::from_secs(5400)));
    assert_eq!(d("500ms"), Ok(Duration::from_millis(500)));
    assert!(d("-1").is_err() && d("soon").is_err() && d("").is_err());
    let r = |x: &str| x.parse::<DataRate>().map(|r| r.0);
    assert_eq!(r("0"), Ok(None));
    assert_eq!(r("1K"), Ok(Some((1024, Duration::from_secs(30)))));
    assert_eq!(r("512/10s"), Ok(Some((512, Duration::from_secs(10)))));
    assert!(r("1K/0").is_err() && r("x/1s").is_err());
}

#[test]
fn sizes_mean_the_same_from_every_source() {
    // 10MB and 10MiB differ, from a flag and from the file alike; the file also
    // takes plain integers (bytes) and, for durations, seconds.
    assert_eq!(
        run(&["--max-message-size", "10MB"], "")
            .unwrap()
            .max_message_size(),
        10_000_000
    );
    assert_eq!(
        run(&["--max-message-size", "10MiB"], "")
            .unwrap()
            .max_message_size(),
        10 << 20
    );
    assert_eq!(
        run(&[], "max-message-size = \"10MB\"")
            .unwrap()
            .max_message_size(),
        10_000_000
    );
    assert_eq!(
        run(&[], "max-message-size = \"10MiB\"")
            .unwrap()
            .max_message_size(),
        10 << 20
    );
    assert_eq!(
        run(&[], "max-message-size = 1234")
            .unwrap()
            .max_message_size(),
        1234
    );
    for (args, file) in [
        (&["--max-message-size", "auto"][..], ""),
        (&[][..], "max-message-size = \"Auto\""),
    ] {
        let c = run(args, file).unwrap();
        assert!(c.max_message_size_auto());
        assert_eq!(c.max_message_size(), AUTO_MAX_MESSAGE_SIZE as usize);
        assert_eq!(c.session.max_message_size.to_string(), "auto");
    }
    assert!(!run(&[], "").unwrap().max_message_size_auto());
    let c = run(&[], "idle-timeout = 7\nmax-session-time = \"2h\"").unwrap();
    assert_eq!(c.limits.idle_timeout.0, Duration::from_secs(7));
    assert_eq!(c.limits.max_session_time.0, Duration::from_secs(7200));
    assert_eq!(
        err(&[], "idle-timeout = -1"),
        "--config f.toml: `idle-timeout`: not a duration (got \"-1\"); e.g. 300, 30s, 5m, 1h"
    );
}

#[test]
fn file_errors_are_one_line_and_name_the_file_and_key() {
    let e = err(&[], "listen = \"127.0.0.1:1\"\nlisen = \"x\"\n");
    assert_eq!(
        e,
        "--config f.toml: unknown key `lisen` (keys are the long flag names, e.g. `listen`, `accept-domain`)"
    );
    // Not even a flag that overrides it makes a bad file value acceptable.
    let e = err(
        &["--reactors", "2"],
        "sink = \"null\"\nreactors = \"many\"\n",
    );
    assert!(
        e.starts_with("--config f.toml: `reactors`: invalid type"),
        "{e}"
    );
    assert!(!e.contains('\n'));
    let e = err(&[], "reactors = \n");
    assert!(e.starts_with("--config f.toml: line 1"), "{e}");
    assert!(!e.contains('\n'));
    let e = err(&[], "sink = \"s3\"\n");
    assert!(
        e.starts_with("--config f.toml: `sink`: unknown variant `s3`"),
        "{e}"
    );
    let e = err(&[], "accept-domain = 1\n");
    assert!(e.contains("expected a string or a list of strings"), "{e}");
    let e = err(&[], "accept-domain = [1]\n");
    assert!(e.starts_with("--config f.toml: `accept-domain`:"), "{e}");
    let e = err(&[], "[server]\nlisten = \"x\"\n");
    assert!(e.contains("unknown key `server`"), "{e}");
    let e = err(&[], "config = \"other.toml\"\n");
    assert!(e.contains("unknown key `config`"), "{e}");
    // Values from the file are validated like flags, and named after the file.
    assert_eq!(
        err(&[], "max-recipients = 0"),
        "--config f.toml: `max-recipients`: must be at least 1 (got 0)"
    );
    assert_eq!(
        err(&[], "max-message-size = 0"),
        "--config f.toml: `max-message-size`: must be between 1 and 1G (got 0)"
    );
    let missing = ServerArgs {
        file: ConfigFileArg {
            config: Some(PathBuf::from("/nonexistent/smtpgw.toml")),
        },
        ..Default::default()
    };
    let e = missing.resolve().unwrap_err().to_string();
    assert!(e.starts_with("--config /nonexistent/smtpgw.toml: cannot read:"));
}

#[test]
fn clap_errors_name_the_flag_on_their_first_line() {
    let e = clap_err(&["--reactors", "abc"], &[]);
    let first = e.lines().next().unwrap();
    assert!(
        first.starts_with("error:") && first.contains("--reactors"),
        "{first}"
    );
    let e = clap_err(&["--sink", "s3"], &[]);
    assert!(e.lines().next().unwrap().contains("--sink"), "{e}");
    assert!(e.contains("possible values: spool, null, kafka"), "{e}");
}

#[test]
fn kafka_settings() {
    let c = run(&[], "").unwrap();
    assert_eq!(c.kafka.kafka_brokers, None);
    assert_eq!(c.kafka.kafka_topic.0, "smtp.inbound");
    assert_eq!(c.kafka.publish_timeout.0, Duration::from_secs(30));
    assert_eq!(c.kafka.max_inflight_messages, 10_000);
    assert_eq!(c.kafka.max_inflight_bytes, ByteSize(256 << 20));

    let c = run(
        &[
            "--sink",
            "kafka",
            "--kafka-brokers",
            "127.0.0.1:9092,127.0.0.1:9093",
            "--kafka-config",
            "security.protocol=SSL",
            "--kafka-config",
            "ssl.ca.location = /etc/ca.pem",
            "--publish-timeout",
            "5s",
            "--max-inflight-bytes",
            "64M",
        ],
        "kafka-topic = \"mail.in\"\nmax-inflight-messages = 7\nkafka-config = [\"linger.ms=5\"]",
    )
    .unwrap();
    assert_eq!(c.spool.sink, SinkKind::Kafka);
    assert_eq!(c.kafka.brokers(), "127.0.0.1:9092,127.0.0.1:9093");
    assert_eq!(c.kafka.kafka_topic.0, "mail.in");
    // Flags replace the file's list rather than adding to it, like --accept-domain.
    let pairs = pairs(&c.kafka);
    assert_eq!(
        pairs,
        [
            ("security.protocol", "SSL"),
            ("ssl.ca.location", "/etc/ca.pem")
        ]
    );
    assert_eq!(c.kafka.publish_timeout.0, Duration::from_secs(5));
    assert_eq!(c.kafka.max_inflight_messages, 7);
    assert_eq!(c.kafka.max_inflight_bytes, ByteSize(64 << 20));
}

#[test]
fn kafka_errors_name_the_flag() {
    assert_eq!(
        err(&["--sink", "kafka"], ""),
        "--kafka-brokers: required with --sink kafka (e.g. --kafka-brokers 127.0.0.1:9092)"
    );
    let k = |extra: &[&str]| {
        let mut args = vec!["--sink", "kafka", "--kafka-brokers", "h:1"];
        args.extend_from_slice(extra);
        err(&args, "")
    };
    let bad_value = |extra: &[&str], words: &str| {
        let e = clap_err(extra, &[]);
        let first = e.lines().next().unwrap();
        assert!(first.contains(extra[0]) && first.contains(words), "{e}");
    };
    bad_value(&["--kafka-config", "linger.ms"], "expected KEY=VALUE");
    bad_value(&["--kafka-config", "=1"], "empty key");
    bad_value(
        &["--kafka-config", "acks=1"],
        "acks: not allowed, the gateway always uses acks=all",
    );
    bad_value(
        &["--kafka-config", "enable.idempotence=false"],
        "not allowed",
    );
    bad_value(
        &["--kafka-config", "message.timeout.ms=1"],
        "--publish-timeout",
    );
    bad_value(&["--kafka-topic", "a b"], "not a Kafka topic name");
    bad_value(&["--max-inflight-bytes", "lots"], "not a size");
    assert!(k(&["--publish-timeout", "0"]).starts_with("--publish-timeout: must be between"));
    assert!(k(&["--publish-timeout", "30d"]).starts_with("--publish-timeout: must be between"));
    assert!(k(&["--max-inflight-messages", "0"]).starts_with("--max-inflight-messages:"));
    assert!(err(&["--sink", "kafka", "--kafka-brokers", " "], "")
        .starts_with("--kafka-brokers: must not be empty"));
}

#[test]
fn spool_replay_parses() {
    let c = parse(&[
        "spool",
        "replay",
        "--spool-dir",
        "/s",
        "--to-kafka",
        "--kafka-brokers",
        "h:1",
        "--kafka-topic",
        "t",
    ])
    .unwrap();
    match c.command {
        Some(Command::Spool(SpoolCommand::Replay { dir, kafka, .. })) => {
            let (spool, file) = dir.resolve().unwrap();
            assert_eq!(spool, PathBuf::from("/s"));
            let k = dir.kafka(kafka, file.as_ref()).unwrap();
            assert_eq!(k.brokers(), "h:1");
            assert_eq!(k.kafka_topic.0, "t");
        }
        other => panic!("{other:?}"),
    }
    assert!(parse(&["spool", "replay", "--kafka-brokers", "h:1"]).is_err());
}

#[test]
fn spool_subcommands() {
    let c = parse(&["spool", "cat", "--body", "--spool-dir", "/s", "ID"]).unwrap();
    match c.command {
        Some(Command::Spool(SpoolCommand::Cat { dir, body, id, .. })) => {
            assert_eq!(dir.store.spool_dir, PathBuf::from("/s"));
            assert!(body);
            assert_eq!(id, "ID");
        }
        other => panic!("{other:?}"),
    }
    let c = parse(&["spool", "export", "--mbox", "out.mbox"]).unwrap();
    assert!(matches!(
        c.command,
        Some(Command::Spool(SpoolCommand::Export { .. }))
    ));
    assert!(parse(&["spool", "export"]).is_err());
}

#[test]
fn errors_name_the_source_of_the_bad_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, "reactors = 0\nmax-recipients = 5\n").unwrap();
    let p = path.to_str().unwrap();
    let resolve_err = |args: &[&str], env: &[(&str, &str)]| {
        parse_with_env(args, env)
            .server
            .resolve()
            .unwrap_err()
            .to_string()
    };
    // From the file: the file and its key.
    assert_eq!(
        resolve_err(&["--config", p], &[]),
        format!("--config {p}: `reactors`: must be between 1 and 1024 (got 0)")
    );
    // From the environment: the variable.
    assert_eq!(
        resolve_err(&["--config", p], &[("SMTPGW_REACTORS", "2000")]),
        "SMTPGW_REACTORS: must be between 1 and 1024 (got 2000)"
    );
    // From the command line: the flag.
    assert_eq!(
        resolve_err(
            &["--config", p, "--reactors", "0"],
            &[("SMTPGW_REACTORS", "2")]
        ),
        "--reactors: must be between 1 and 1024 (got 0)"
    );
    assert!(resolve_err(&[], &[("SMTPGW_LOG", "smtpgw=loud")])
        .starts_with("SMTPGW_LOG: invalid log filter"));

    // A value of the wrong type, from each source: the file's is refused on
    // loading, the variable's and the flag's by clap, named after their source.
    std::fs::write(&path, "kafka-topic = \"a b\"\n").unwrap();
    assert_eq!(
        resolve_err(&["--config", p], &[]),
        format!("--config {p}: `kafka-topic`: not a Kafka topic name (got \"a b\"); use letters, digits, '.', '_' and '-'")
    );
    let e = clap_err(&[], &[("SMTPGW_MAX_MESSAGE_SIZE", "10X")]);
    assert_eq!(
        e,
        "error: SMTPGW_MAX_MESSAGE_SIZE: not a size (got \"10X\"); auto, or e.g. 10485760, 512K, 10M (= 10MiB), 10MB (= 10000000)\n"
    );
    let e = clap_err(&[], &[("SMTPGW_SINK", "tape")]);
    assert_eq!(
        e,
        "error: SMTPGW_SINK: invalid value \"tape\"; possible values: spool, null, kafka\n"
    );
    let e = clap_err(
        &["--max-message-size", "10X"],
        &[("SMTPGW_MAX_MESSAGE_SIZE", "1M")],
    );
    assert!(
        e.starts_with("error: invalid value '10X' for '--max-message-size"),
        "{e}"
    );
    let e = clap_err(&[], &[("SMTPGW_KAFKA_CONFIG", "linger.ms=5;acks=0")]);
    assert!(
        e.starts_with("error: SMTPGW_KAFKA_CONFIG: acks: not allowed"),
        "{e}"
    );
    // A spool tool's variables are named too.
    let e = clap_err(
        &["spool", "replay", "--to-kafka"],
        &[("SMTPGW_PUBLISH_TIMEOUT", "soon")],
    );
    assert!(
        e.starts_with("error: SMTPGW_PUBLISH_TIMEOUT: not a duration"),
        "{e}"
    );
}

#[test]
fn kafka_config_from_the_environment_takes_several_settings() {
    let cli = parse_with_env(
        &["--sink", "kafka", "--kafka-brokers", "h:1"],
        &[(
            "SMTPGW_KAFKA_CONFIG",
            "security.protocol=SASL_SSL;sasl.mechanism=SCRAM-SHA-512;ssl.cipher.suites=A,B",
        )],
    );
    let c = resolve(cli.server, None, host).unwrap();
    let pairs = pairs(&c.kafka);
    assert_eq!(
        pairs,
        [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("ssl.cipher.suites", "A,B"),
        ]
    );
}

#[test]
fn spool_subcommands_read_the_spool_dir_from_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        "spool-dir = \"/var/spool/gw\"\nkafka-topic = \"t.file\"\n",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let spool_dir = |args: &[&str]| match parse_with_env(args, &[]).command {
        Some(Command::Spool(SpoolCommand::Ls { dir, .. })) => dir.resolve().map(|(d, _)| d),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        spool_dir(&["spool", "ls", "--config", p]).unwrap(),
        PathBuf::from("/var/spool/gw")
    );
    assert_eq!(
        spool_dir(&["spool", "ls", "--config", p, "--spool-dir", "/x"]).unwrap(),
        PathBuf::from("/x")
    );
    assert_eq!(
        spool_dir(&["spool", "ls"]).unwrap(),
        PathBuf::from("./spool")
    );
    // Replay takes the file's Kafka settings under its flags.
    match parse_with_env(&["spool", "replay", "--to-kafka", "--config", p], &[]).command {
        Some(Command::Spool(SpoolCommand::Replay { dir, kafka, .. })) => {
            let (_, file) = dir.resolve().unwrap();
            assert_eq!(
                dir.kafka(kafka, file.as_ref()).unwrap().kafka_topic.0,
                "t.file"
            );
        }
        other => panic!("{other:?}"),
    }
    // Each spool subcommand has its own help (its about text, --config), not the
    // server's; tests/e2e/test_cli.py checks the words through the binary.
    let mut cmd = command();
    let spool = cmd.find_subcommand_mut("spool").unwrap();
    let names: Vec<String> = spool
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    assert_eq!(names.len(), 10, "{names:?}");
    for name in names {
        let sub = spool.find_subcommand_mut(&name).unwrap();
        let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
        let help = sub.render_long_help().to_string();
        assert!(!about.is_empty() && help.contains(&about), "{name}: {help}");
        assert!(help.contains("--config"), "{name}: {help}");
        assert!(!help.contains("--max-recipients"), "{name}: {help}");
    }
}

#[test]
fn spool_fallback_needs_the_kafka_sink() {
    let k = ["--sink", "kafka", "--kafka-brokers", "h:1"];
    assert!(!run(&k, "").unwrap().spool.spool_fallback);
    let mut args = k.to_vec();
    args.push("--spool-fallback");
    assert!(run(&args, "").unwrap().spool.spool_fallback);
    assert!(
        run(&k, "spool-fallback = true")
            .unwrap()
            .spool
            .spool_fallback
    );
    assert_eq!(
        err(&["--spool-fallback"], ""),
        "--spool-fallback: only with --sink kafka (the spool is the fallback for Kafka)"
    );
}

#[test]
fn the_partition_key_takes_three_values() {
    assert_eq!(
        run(&[], "").unwrap().kafka.kafka_partition_key,
        PartitionKey::Id
    );
    assert_eq!(
        run(&["--kafka-partition-key", "sender-domain"], "")
            .unwrap()
            .kafka
            .kafka_partition_key,
        PartitionKey::SenderDomain
    );
    assert_eq!(
        run(&[], "kafka-partition-key = \"recipient-domain\"")
            .unwrap()
            .kafka
            .kafka_partition_key,
        PartitionKey::RecipientDomain
    );
    assert!(err(&[], "kafka-partition-key = \"subject\"").contains("kafka-partition-key"));
}

#[test]
fn the_forward_window_is_bounded() {
    assert_eq!(run(&[], "").unwrap().spool.forward_window, 2000);
    assert_eq!(
        run(&["--forward-window", "1"], "")
            .unwrap()
            .spool
            .forward_window,
        1
    );
    assert_eq!(
        run(&[], "forward-window = 7").unwrap().spool.forward_window,
        7
    );
    assert_eq!(
        err(&["--forward-window", "0"], ""),
        "--forward-window: must be between 1 and 2000 (got 0)"
    );
    assert_eq!(
        err(&[], "forward-window = 2001"),
        "--config f.toml: `forward-window`: must be between 1 and 2000 (got 2001)"
    );
}

#[test]
fn topic_prefixed_aliases_of_reserved_settings_are_refused() {
    let k = |pair: &str| clap_err(&["--kafka-config", pair], &[]);
    assert!(k("topic.message.timeout.ms=1").contains("--publish-timeout"));
    assert!(k("topic.delivery.timeout.ms=1").contains("--publish-timeout"));
    assert!(k("topic.acks=1").contains("acks=all"));
    assert!(k("topic.request.required.acks=0").contains("acks=all"));
    // A global setting whose own name starts with `topic.` stays allowed.
    let ok = run(
        &[
            "--sink",
            "kafka",
            "--kafka-brokers",
            "h:1",
            "--kafka-config",
            "topic.metadata.refresh.interval.ms=1000",
        ],
        "",
    )
    .unwrap();
    assert_eq!(ok.kafka.kafka_config.len(), 1);
}

#[test]
fn spool_check_prune_and_skip_corrupt_parse() {
    let c = parse(&["spool", "ls", "--skip-corrupt"]).unwrap();
    assert!(matches!(
        c.command,
        Some(Command::Spool(SpoolCommand::Ls {
            corrupt: SkipCorruptArg { skip_corrupt: true },
            ..
        }))
    ));
    let c = parse(&["spool", "export", "--mbox", "m", "--force"]).unwrap();
    assert!(matches!(
        c.command,
        Some(Command::Spool(SpoolCommand::Export { force: true, .. }))
    ));
    assert!(parse(&["spool", "check"]).is_ok());
    let c = parse(&["spool", "prune", "--before", "2026-01-01T00:00:00Z"]).unwrap();
    assert!(matches!(
        c.command,
        Some(Command::Spool(SpoolCommand::Prune { dry_run: false, .. }))
    ));
    assert!(
        parse(&["spool", "prune"]).is_err(),
        "--before or --before-cursor is required"
    );
    assert!(parse(&["spool", "prune", "--before-cursor", "c"]).is_ok());
    assert!(
        parse(&["spool", "prune", "--before", "x", "--before-cursor", "c"]).is_err(),
        "one cut-off"
    );
}

#[test]
fn spool_limits_parse_and_name_their_source() {
    let c = run(&[], "").unwrap();
    assert_eq!(c.spool.spool_max_bytes, ByteSize(0));
    assert_eq!(c.spool.spool_min_free_bytes, ByteSize(64 << 20));
    let c = run(&["--spool-max-bytes", "2G"], "spool-min-free-bytes = 0").unwrap();
    assert_eq!(c.spool.spool_max_bytes, ByteSize(2 << 30));
    assert_eq!(c.spool.spool_min_free_bytes, ByteSize(0));
    let e = clap_err(&["--spool-max-bytes", "lots"], &[]);
    assert!(
        e.contains("--spool-max-bytes") && e.contains("not a size"),
        "{e}"
    );
    let e = clap_err(&["--spool-min-free-bytes=-1"], &[]);
    assert!(
        e.contains("--spool-min-free-bytes") && e.contains("not a size"),
        "{e}"
    );
    let e = clap_err(&[], &[("SMTPGW_SPOOL_MAX_BYTES", "lots")]);
    assert!(
        e.starts_with("error: SMTPGW_SPOOL_MAX_BYTES: not a size"),
        "{e}"
    );
    let e = err(&[], "spool-min-free-bytes = \"-1\"\n");
    assert!(
        e.starts_with("--config f.toml: `spool-min-free-bytes`: not a size"),
        "{e}"
    );
}
