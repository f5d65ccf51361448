"""SMTP AUTH (RFC 4954) through the binary, on both backends: Python smtplib's login and
swaks --auth PLAIN and LOGIN over STARTTLS, the protocol table on the wire, AUTH never
offered in plaintext (unless allowed on loopback), the brute-force limit per address,
the users file re-read on SIGHUP and on change (a broken one keeps the old users), the
same order of time for an unknown user as for a wrong password, what an authenticated
sender gets (smtp.auth, ESMTPSA, the transaction line, --auth-relay, --require-auth,
the per-user message rate), and the start-up errors that name the flag. Hostile
clients: byte-by-byte and maximal AUTH lines, AUTH and MAIL in one write, clients
leaving mid-verification, 300 concurrent AUTHs, SIGHUP and SIGTERM mid-verification,
the users file replaced by a FIFO or /dev/zero, plaintext AUTH behind PROXY."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import smtplib
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from conftest import gateway_binary, gateway_env, run_binary
from edge_support import client_context, headers, listener_port, make_certificate, metric, tls_port, wire_from
from smtpwire import IO_TIMEOUT, Wire, assert_reply, make_message
from test_message_log import parse, refusals, wait_lines
from test_proxy import v2_tcp4


def hash_password(password: str) -> str:
    """`smtpgw auth hash`, the password on standard input."""
    result = subprocess.run(
        [str(gateway_binary()), "auth", "hash"],
        input=(password + "\n").encode(),
        capture_output=True,
        timeout=60,
        env=gateway_env(),
    )
    assert result.returncode == 0, result.stderr.decode()
    line = result.stdout.decode().strip()
    assert line.startswith("$argon2id$"), line
    return line


HASHES: dict[str, str] = {}


def users_text(users: dict[str, str | tuple[str, str]]) -> str:
    lines = ["# name:hash[:rate=N]"]
    for name, spec in users.items():
        password, options = spec if isinstance(spec, tuple) else (spec, "")
        if password not in HASHES:
            HASHES[password] = hash_password(password)
        lines.append(f"{name}:{HASHES[password]}" + (f":{options}" if options else ""))
    return "\n".join(lines) + "\n"


@pytest.fixture
def users(tmp_path) -> Path:
    path = tmp_path / "users"
    path.write_text(users_text({"alice": "secret", "bob": ("hunter2", "rate=1")}))
    return path


@pytest.fixture
def cert(tmp_path):
    return make_certificate(tmp_path)


def tls_auth_gateway(start_gateway, cert, users, *extra: str):
    crt, key = cert
    return start_gateway(
        "--hostname", "mx.test", "--tls-cert", str(crt), "--tls-key", str(key),
        "--auth-users", str(users), *extra,
    )


def plain_auth_gateway(start_gateway, users, *extra: str):
    """AUTH over plaintext: allowed only because the listener is loopback."""
    return start_gateway("--hostname", "mx.test", "--auth-users", str(users), "--auth-allow-plaintext", *extra)


def metric_reaches(gateway, name: str, want: float, timeout: float = 10.0) -> float:
    """The sample once it reaches `want` (reactors publish their counts every 100 ms)."""
    deadline = time.monotonic() + timeout
    while (value := metric(gateway, name)) < want and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def plain(user: bytes, password: bytes) -> str:
    """`AUTH PLAIN` with its initial response."""
    return "AUTH PLAIN " + b64(b"\0" + user + b"\0" + password)


def starttls_client(gateway, cert) -> smtplib.SMTP:
    client = smtplib.SMTP(gateway.host, gateway.port, local_hostname="client.test", timeout=IO_TIMEOUT)
    client.ehlo()
    assert not client.has_extn("auth"), "AUTH offered before TLS"
    client.starttls(context=client_context(cert[0]))
    client.ehlo()
    return client


def test_smtplib_login_over_starttls_records_the_user(start_gateway, cert, users):
    gateway = tls_auth_gateway(start_gateway, cert, users)
    message = make_message("auth", b"Sent by alice.\r\n")
    with starttls_client(gateway, cert) as client:
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        assert client.login("alice", "secret") == (235, b"2.7.0 Authentication successful")
        client.sendmail("alice@client.test", ["x@example.com"], message, mail_options=["AUTH=<>"])
    with starttls_client(gateway, cert) as client:
        # smtplib's LOGIN, chosen explicitly.
        client.user, client.password = "alice", "secret"
        assert client.auth("LOGIN", client.auth_login)[0] == 235
        client.sendmail("alice@client.test", ["y@example.com"], message)
    ids = gateway.spool_ids()
    assert len(ids) == 2
    for message_id in ids:
        stored = headers(gateway, message_id)
        assert stored["smtp.auth"] == ["alice"]
        assert b" with ESMTPSA id " in gateway.cat(message_id)
        assert gateway.cat(message_id, body=True) == message
    params = sorted(p for i in ids for p in headers(gateway, i)["smtp.mail_params"])
    assert any(p.endswith("AUTH=<>") for p in params), params
    lines = wait_lines(gateway, lambda p: p["target"] == "smtpgw::message", 2)
    assert {line.get("auth") for line in lines} == {"alice"}, lines
    assert metric_reaches(gateway, 'smtpgw_auth_total{result="success"}', 2) == 2


def test_auth_on_the_implicit_tls_listener(start_gateway, cert, users):
    gateway = tls_auth_gateway(start_gateway, cert, users, "--listen-tls", "127.0.0.1:0", "--require-auth")
    with smtplib.SMTP_SSL(gateway.host, tls_port(gateway), local_hostname="client.test", timeout=IO_TIMEOUT,
                          context=client_context(cert[0])) as client:
        client.ehlo()
        assert client.has_extn("auth") and not client.has_extn("starttls")
        code, _ = client.mail("a@client.test")
        assert code == 530
        client.login("alice", "secret")
        client.sendmail("alice@client.test", ["x@example.com"], make_message("implicit-auth"))
    [message_id] = gateway.spool_ids()
    assert headers(gateway, message_id)["smtp.auth"] == ["alice"]
    assert b" with ESMTPSA id " in gateway.cat(message_id)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_auth(start_gateway, cert, users, mechanism):
    gateway = tls_auth_gateway(start_gateway, cert, users)
    def swaks(password: str) -> tuple[int, str]:
        result = subprocess.run(
            ["swaks", "--server", "127.0.0.1", "--port", str(gateway.port), "--helo", "client.test",
             "--from", "alice@client.test", "--to", "x@example.com", "--timeout", "20", "--tls",
             "--auth", mechanism, "--auth-user", "alice", "--auth-password", password],
            capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        return result.returncode, result.stdout.decode("utf-8", "replace") + result.stderr.decode("utf-8", "replace")

    code, transcript = swaks("secret")
    assert code == 0, transcript
    assert "235 2.7.0 Authentication successful" in transcript, transcript
    [message_id] = gateway.spool_ids()
    assert headers(gateway, message_id)["smtp.auth"] == ["alice"]
    # A wrong password is refused by swaks' own account, and nothing is stored.
    code, transcript = swaks("wrong")
    assert code != 0 and "535 5.7.8" in transcript, transcript
    assert len(gateway.spool_ids()) == 1


def tls_wire(gateway, cert) -> smtplib.SMTP:
    """An smtplib client after STARTTLS and EHLO, for raw commands (docmd)."""
    return starttls_client(gateway, cert)


def test_protocol_table_over_tls(start_gateway, cert, users):
    gateway = tls_auth_gateway(start_gateway, cert, users)
    good, wrong, unknown = b64(b"\0alice\0secret"), b64(b"\0alice\0nope"), b64(b"\0mallory\0secret")
    table = [
        ([f"AUTH PLAIN {good}"], ["235 2.7.0"]),
        ([f"AUTH PLAIN {wrong}"], ["535 5.7.8"]),
        ([f"AUTH PLAIN {unknown}"], ["535 5.7.8"]),
        (["AUTH PLAIN", good], ["334", "235 2.7.0"]),
        (["AUTH LOGIN", b64(b"alice"), b64(b"secret")], ["334", "334", "235 2.7.0"]),
        ([f"AUTH LOGIN {b64(b'alice')}", b64(b"secret")], ["334", "235 2.7.0"]),
        (["AUTH PLAIN", "*"], ["334", "501 5.7.0"]),
        (["AUTH LOGIN", b64(b"alice"), "*"], ["334", "334", "501 5.7.0"]),
        (["AUTH PLAIN not-base64!"], ["501 5.5.2"]),
        (["AUTH CRAM-MD5"], ["504 5.5.4"]),
        ([f"AUTH PLAIN {good}", f"AUTH PLAIN {good}"], ["235 2.7.0", "503 5.5.1"]),
        (["MAIL FROM:<a@client.test>", f"AUTH PLAIN {good}"], ["250 2.1.0", "503 5.5.1"]),
    ]
    for commands, want in table:
        with tls_wire(gateway, cert) as client:
            got = []
            for command in commands:
                code, text = client.docmd(command)
                enhanced = text.decode().split(" ", 1)[0] if code != 334 else ""
                got.append(f"{code} {enhanced}".strip())
            assert got == want, (commands, got)
            # The session goes on after each refusal.
            assert client.noop()[0] == 250, commands


def test_auth_is_never_offered_in_plaintext(start_gateway, cert, users):
    gateway = tls_auth_gateway(start_gateway, cert, users)
    with Wire(gateway.host, gateway.port) as w:
        w.reply()
        ehlo = w.cmd("EHLO client.test")
        assert not any("AUTH" in line for line in ehlo.lines), ehlo.lines
        assert_reply(w.cmd(plain(b"alice", b"secret")), "538 5.7.11")
        # Never read: 538 comes before any credentials are looked at.
        assert_reply(w.cmd("QUIT"), "221")
    assert gateway.metric('smtpgw_auth_total{result="success"}') == 0


def test_require_auth_and_auth_relay(start_gateway, users):
    gateway = plain_auth_gateway(start_gateway, users, "--require-auth", "--auth-relay")
    with Wire(gateway.host, gateway.port) as w:
        w.reply()
        ehlo = w.cmd("EHLO client.test")
        assert "250-AUTH PLAIN LOGIN" in ehlo.lines, ehlo.lines
        w.expect("MAIL FROM:<a@client.test>", "530 5.7.0")
        w.expect(plain(b"alice", b"secret"), "235 2.7.0")
        w.expect("MAIL FROM:<a@client.test>", "250")
        # Authenticated with --auth-relay: any recipient domain.
        w.expect("RCPT TO:<someone@elsewhere.test>", "250 2.1.5")
        w.expect("DATA", "354")
        w.send(b"Subject: relayed\r\n\r\nbody\r\n.\r\n")
        assert_reply(w.reply(), "250 2.0.0")
    with Wire(gateway.host, gateway.port) as w:
        w.reply()
        w.cmd("EHLO client.test")
        w.expect(plain(b"alice", b"secret"), "235")
        w.expect("MAIL FROM:<a@client.test>", "250")
    [message_id] = gateway.spool_ids()
    stored = headers(gateway, message_id)
    assert stored["smtp.rcpt_to"] == ["someone@elsewhere.test"]
    # Over plaintext (loopback): RFC 3848's ESMTPA.
    assert b" with ESMTPA id " in gateway.cat(message_id)


def test_unauthenticated_sessions_stay_limited_to_accept_domain(start_gateway, users):
    gateway = plain_auth_gateway(start_gateway, users, "--auth-relay")
    with Wire(gateway.host, gateway.port) as w:
        w.reply()
        w.cmd("EHLO client.test")
        w.expect("MAIL FROM:<a@client.test>", "250")
        w.expect("RCPT TO:<someone@elsewhere.test>", "550 5.7.1")
        w.expect("RCPT TO:<someone@example.com>", "250")


def test_brute_force_limit_per_address(start_gateway, users):
    # Loopback is trusted (exempt from the per-address limits) by default.
    gateway = plain_auth_gateway(
        start_gateway, users, "--max-auth-failures-per-ip", "3", "--trusted-cidr", "192.0.2.0/24"
    )
    wrong = b64(b"\0alice\0guess")
    with Wire(gateway.host, gateway.port) as w:
        w.reply()
        w.cmd("EHLO client.test")
        w.expect(f"AUTH PLAIN {wrong}", "535 5.7.8")
        w.expect(plain(b"eve", b"guess"), "535 5.7.8")
        w.send(f"AUTH PLAIN {wrong}\r\n")
        assert_reply(w.reply(), "535 5.7.8")
        assert_reply(w.reply(), "421 4.7.0")
        assert w.closed_by_server()
    # Another connection from the address: refused at AUTH, even with the right password.
    assert_locked_out(gateway, b"alice", b"secret")
    failures = refusals(gateway, "auth_failed", 3)
    assert [f.get("user") for f in failures] == ["alice", "eve", "alice"], failures
    assert all(f.get("client", "").startswith("127.0.0.1:") for f in failures), failures
    assert metric_reaches(gateway, 'smtpgw_auth_total{result="failure"}', 3) == 3
    assert metric_reaches(gateway, 'smtpgw_auth_total{result="locked"}', 2) == 2
    assert metric_reaches(gateway, 'smtpgw_session_limit_closes_total{reason="auth_failures"}', 2) == 2


def assert_locked_out(gateway, user: bytes, password: bytes) -> None:
    """AUTH gets `421 4.7.0` for too many failures, unverified, and the session closes."""
    with Wire(gateway.host, gateway.port) as w:
        w.reply()
        w.cmd("EHLO client.test")
        w.send(plain(user, password) + "\r\n")
        reply = assert_reply(w.reply(), "421 4.7.0")
        assert "authentication failures" in reply.text, reply.text
        assert w.closed_by_server()


def login(gateway, user: bytes, password: bytes) -> str:
    with Wire(gateway.host, gateway.port) as w:
        w.reply()
        w.cmd("EHLO client.test")
        return str(w.cmd(plain(user, password)).code)


def wait_code(gateway, user: bytes, password: bytes, want: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := login(gateway, user, password)) != want:
        assert time.monotonic() < deadline, f"{user!r}: still {got}, not {want}:\n{gateway.stderr}"
        time.sleep(0.1)


def test_users_file_reload_on_sighup_and_on_change(start_gateway, users, tmp_path):
    gateway = plain_auth_gateway(start_gateway, users)
    assert login(gateway, b"alice", b"secret") == "235"
    assert login(gateway, b"carol", b"pw3") == "535"
    # Changed in place: picked up without a signal.
    users.write_text(users_text({"alice": "secret", "carol": "pw3"}))
    wait_code(gateway, b"carol", b"pw3", "235")
    # A broken file is refused, logged, and the users in force stay.
    users.write_text("carol:not-a-hash\n")
    gateway.send_signal(signal.SIGHUP)
    wait_lines(gateway, lambda p: "AUTH users file refused" in p.get("message", ""))
    assert "line 1" in gateway.stderr
    assert login(gateway, b"carol", b"pw3") == "235"
    # Replaced (rename over it), then SIGHUP: alice is gone.
    new = tmp_path / "users.new"
    new.write_text(users_text({"carol": "pw3"}))
    os.rename(new, users)
    gateway.send_signal(signal.SIGHUP)
    wait_code(gateway, b"alice", b"secret", "535")
    assert login(gateway, b"carol", b"pw3") == "235"


def test_unknown_user_and_wrong_password_take_the_same_order_of_time(start_gateway, users):
    gateway = plain_auth_gateway(start_gateway, users, "--max-auth-failures-per-ip", "0")

    def timed(user: bytes) -> float:
        with Wire(gateway.host, gateway.port) as w:
            w.reply()
            w.cmd("EHLO client.test")
            start = time.perf_counter()
            reply = w.cmd(plain(user, b"wrong"))
            took = time.perf_counter() - start
            assert_reply(reply, "535 5.7.8")
            return took

    timed(b"alice")  # warm up
    rounds = [(timed(b"alice"), timed(b"nobody-at-all")) for _ in range(7)]
    wrong = statistics.median(r[0] for r in rounds)
    unknown = statistics.median(r[1] for r in rounds)
    # argon2 costs milliseconds; skipping it for an unknown name would be 100x faster.
    assert wrong > 0.002, wrong
    assert 1 / 3 < unknown / wrong < 3, (wrong, unknown)


def test_per_user_message_rate(start_gateway, users):
    gateway = plain_auth_gateway(start_gateway, users, "--max-message-rate-per-user", "5")
    with Wire(gateway.host, gateway.port) as w:
        w.reply()
        w.cmd("EHLO client.test")
        w.expect(plain(b"bob", b"hunter2"), "235")
        # bob's line says rate=1: the second message in the minute is refused.
        for expect in ("250", "421 4.7.0"):
            reply = w.cmd("MAIL FROM:<bob@client.test>")
            assert_reply(reply, expect)
            if expect == "250":
                w.expect("RCPT TO:<x@example.com>", "250")
                w.expect("DATA", "354")
                w.send(b"Subject: rate\r\n\r\nbody\r\n.\r\n")
                assert_reply(w.reply(), "250 2.0.0")
        assert "for your user" in reply.text
    # alice takes the default, 5 a minute.
    with Wire(gateway.host, gateway.port) as w:
        w.reply()
        w.cmd("EHLO client.test")
        w.expect(plain(b"alice", b"secret"), "235")
        w.expect("MAIL FROM:<alice@client.test>", "250")


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--auth-users", "USERS"], "--auth-users"),  # no TLS, no --auth-allow-plaintext
        (["--require-auth"], "--require-auth"),
        (["--auth-relay"], "--auth-relay"),
        (["--auth-users", "USERS", "--auth-allow-plaintext", "--listen", "0.0.0.0:0"], "--auth-allow-plaintext"),
        (["--auth-users", "BROKEN", "--auth-allow-plaintext"], "--auth-users"),
    ],
)
def test_configuration_errors_name_the_flag(args, flag, tmp_path, users):
    args_given = list(args)
    broken = tmp_path / "broken"
    broken.write_text(f"alice:{HASHES.get('secret') or hash_password('secret')}\nbob:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0\n")
    args = [str(users) if a == "USERS" else str(broken) if a == "BROKEN" else a for a in args]
    listen = [] if "--listen" in args else ["--listen", "127.0.0.1:0"]
    result = run_binary(*listen, "--metrics-listen", "127.0.0.1:0",
                        "--spool-dir", str(tmp_path / "spool"), *args, timeout=30)
    assert result.returncode == 2, result.stderr
    last = result.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("error: " + flag), last
    if "BROKEN" in args_given:
        assert "line 2" in last and "`bob`" in last, last


def test_auth_hash_takes_no_password_argument():
    result = run_binary("auth", "hash", "secret")
    assert result.returncode == 2 and b"unexpected argument" in result.stderr, result.stderr
    result = subprocess.run([str(gateway_binary()), "auth", "hash"], input=b"", capture_output=True,
                            timeout=60, env=gateway_env())
    assert result.returncode == 1 and b"no password" in result.stderr, result.stderr


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_postfix(d: Path, relay_to: int, sasl: str) -> tuple[Path, int]:
    """A private Postfix (its own config, queue and log under `d`, nothing of the
    system's) that relays everything to 127.0.0.1:`relay_to` with SASL over mandatory
    TLS. Returns its config dir and SMTP port."""
    etc, queue, data = d / "etc", d / "queue", d / "data"
    for p in (etc, queue, data):
        p.mkdir(parents=True)
    # The postfix user must reach its data directory; pytest's tmp dirs are 0700.
    for p in [d, *d.parents]:
        if str(p) in ("/", "/tmp"):
            break
        p.chmod(p.stat().st_mode | 0o755)
    subprocess.run(["chown", "postfix", str(data)], check=True)
    port = free_port()
    master = []
    for line in Path("/etc/postfix/master.cf").read_text().splitlines():
        fields = line.split()
        if line[:1] not in ("", "#", " ", "\t") and len(fields) >= 8:
            if fields[0] == "smtp" and fields[1] == "inet":
                fields[0] = f"127.0.0.1:{port}"
            fields[4] = "n"  # no chroot: the SASL plugins and TLS live outside the queue
            line = "  ".join(fields[:8]) + (" " + " ".join(fields[8:]) if len(fields) > 8 else "")
        master.append(line)
    (etc / "master.cf").write_text("\n".join(master) + "\n")
    if Path("/etc/postfix/dynamicmaps.cf").exists():
        (etc / "dynamicmaps.cf").write_text(Path("/etc/postfix/dynamicmaps.cf").read_text())
    (etc / "main.cf").write_text(f"""compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = relay.test
mydestination =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{relay_to}
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = static:{sasl}
smtp_sasl_security_options = noanonymous
smtp_sasl_tls_security_options = noanonymous
smtp_tls_security_level = encrypt
smtp_tls_mandatory_protocols = >=TLSv1.2
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
biff = no
""")
    result = subprocess.run(["postfix", "-c", str(etc), "start"], capture_output=True, timeout=60)
    log = d / "maillog"
    assert result.returncode == 0, result.stderr.decode() + (log.read_text() if log.exists() else "")
    return etc, port


def test_postfix_relays_with_sasl_over_mandatory_tls(start_gateway, cert, users, tmp_path):
    """A real MTA nobody here wrote: Postfix with smtp_sasl_auth_enable and
    smtp_tls_security_level = encrypt relays to the gateway, which requires AUTH."""
    if not shutil.which("postfix"):
        pytest.skip("postfix is not installed (scripts/test.sh installs it)")
    gateway = tls_auth_gateway(start_gateway, cert, users, "--require-auth", "--auth-relay")
    d = tmp_path / "postfix"
    etc, port = start_postfix(d, gateway.port, "alice:secret")
    try:
        message = make_message("via-postfix", b"Relayed by Postfix.\r\n")
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=IO_TIMEOUT) as client:
            client.sendmail("app@client.test", ["someone@elsewhere.test"], message)
        deadline = time.monotonic() + 60
        while not gateway.spool_ids():
            log = (d / "maillog").read_text() if (d / "maillog").exists() else ""
            assert time.monotonic() < deadline, f"Postfix did not relay:\n{log}\n{gateway.stderr}"
            time.sleep(0.2)
        [message_id] = gateway.spool_ids()
        stored = headers(gateway, message_id)
        assert stored["smtp.auth"] == ["alice"]
        assert stored["smtp.tls"][0].startswith("TLSv1."), stored["smtp.tls"]
        assert stored["smtp.rcpt_to"] == ["someone@elsewhere.test"]
        assert stored["smtp.helo"] == ["relay.test"]
        assert b" with ESMTPSA id " in gateway.cat(message_id)
        assert b"Relayed by Postfix." in gateway.cat(message_id, body=True)
        # Postfix says how it got in: SASL over TLS, and the gateway's 250.
        log = (d / "maillog").read_text()
        assert "status=sent" in log, log
    finally:
        subprocess.run(["postfix", "-c", str(etc), "stop"], capture_output=True, timeout=60)


def test_per_user_lockout_across_connections(start_gateway, users):
    # Loopback is exempt from the per-address limit by default, so only the per-user
    # count (same flag) can lock: three failures for alice, each on its own connection.
    gateway = plain_auth_gateway(start_gateway, users, "--max-auth-failures-per-ip", "3")
    for _ in range(3):
        assert login(gateway, b"alice", b"guess") == "535"
    # The right password no longer opens alice, from any connection; bob is untouched.
    assert_locked_out(gateway, b"alice", b"secret")
    assert login(gateway, b"bob", b"hunter2") == "235"
    assert metric_reaches(gateway, 'smtpgw_auth_total{result="locked"}', 1) == 1
    assert metric_reaches(gateway, 'smtpgw_session_limit_closes_total{reason="auth_failures"}', 1) == 1


def test_help_lists_auth_where_it_is_offered(start_gateway, cert, users):
    gateway = tls_auth_gateway(start_gateway, cert, users)
    with Wire(gateway.host, gateway.port) as w:
        w.reply()
        w.cmd("EHLO client.test")
        assert "AUTH" not in w.cmd("HELP").text
        assert_reply(w.cmd("HELP AUTH"), "504")
    client = starttls_client(gateway, cert)
    code, text = client.docmd("HELP")
    assert code == 214 and b" AUTH" in text, text
    code, text = client.docmd("HELP", "AUTH")
    assert code == 214 and b"PLAIN|LOGIN" in text, text
    client.quit()


# Hostile clients.

def test_auth_line_trickled_byte_by_byte_and_maximal_responses(start_gateway, users):
    gateway = plain_auth_gateway(start_gateway, users)
    with Wire(gateway.host, gateway.port) as w:
        w.reply()
        w.cmd("EHLO client.test")
        w.send_bytewise((plain(b"alice", b"secret") + "\r\n").encode())
        assert_reply(w.reply(), "235 2.7.0")
    with Wire(gateway.host, gateway.port) as w:
        w.reply()
        w.cmd("EHLO client.test")
        # The longest name and password the gateway takes: verified (and wrong).
        w.expect(plain(b"u" * 255, b"p" * 1024), "535 5.7.8")
        # Base64 that fills the response line but decodes past the limits: 501.
        w.expect("AUTH PLAIN " + b64(b"\0alice\0" + b"p" * 9000), "501 5.5.2")
        # Past the line limit: 500 and the exchange is over, the session is not.
        w.expect("AUTH PLAIN " + "A" * 20000, "500 5.5.6")
        w.expect("AUTH LOGIN", "334")
        w.expect("A" * 20000, "500 5.5.6")
        w.expect(plain(b"alice", b"secret"), "235 2.7.0")


@pytest.mark.parametrize("password,auth_code,mail_code", [(b"secret", "235", "250"), (b"wrong", "535", "530")])
def test_pipelined_auth_and_mail_wait_for_the_verdict(start_gateway, users, password, auth_code, mail_code):
    # RFC 4954: the client must wait for AUTH's reply. One that does not gets MAIL
    # judged after the verdict, never before it.
    gateway = plain_auth_gateway(start_gateway, users, "--require-auth")
    with Wire(gateway.host, gateway.port) as w:
        w.reply()
        w.cmd("EHLO client.test")
        w.send(plain(b"alice", password) + "\r\nMAIL FROM:<a@example.com>\r\n")
        assert_reply(w.reply(), auth_code)
        assert_reply(w.reply(), mail_code)


def test_clients_leaving_during_verification_get_no_verdict_misrouted(start_gateway, users):
    # A right password whose client vanished (reset, or QUIT pipelined behind it) must
    # not answer the next connection, which reuses its slot: that one's wrong password
    # always gets 535.
    gateway = plain_auth_gateway(start_gateway, users, "--max-auth-failures-per-ip", "0")
    for i in range(12):
        gone = Wire(gateway.host, gateway.port)
        gone.reply()
        gone.cmd("EHLO client.test")
        if i % 2:
            gone.send(plain(b"alice", b"secret") + "\r\n")
            gone.abort()
        else:
            gone.send(plain(b"alice", b"secret") + "\r\nQUIT\r\n")
            gone.close()
        with Wire(gateway.host, gateway.port) as w:
            w.reply()
            w.cmd("EHLO client.test")
            assert_reply(w.cmd(plain(b"eve", b"guess")), "535 5.7.8")
    # QUIT behind AUTH is answered after the verdict.
    with Wire(gateway.host, gateway.port) as w:
        w.reply()
        w.cmd("EHLO client.test")
        w.send(plain(b"alice", b"secret") + "\r\nQUIT\r\n")
        assert_reply(w.reply(), "235")
        assert_reply(w.reply(), "221")


def test_a_full_verifier_queue_answers_454_and_nothing_hangs(start_gateway, users):
    gateway = plain_auth_gateway(start_gateway, users, "--max-auth-failures-per-ip", "0")
    wires = []
    try:
        for _ in range(300):
            w = Wire(gateway.host, gateway.port, timeout=120)
            w.reply()
            w.cmd("EHLO client.test")
            wires.append(w)
        line = (plain(b"alice", b"guess") + "\r\n").encode()
        for w in wires:
            w.send(line)
        # SIGHUP while the verifiers work: the users file is re-read, nothing is lost.
        gateway.send_signal(signal.SIGHUP)
        codes = [str(w.reply().code) for w in wires]
    finally:
        for w in wires:
            w.close()
    assert set(codes) <= {"535", "454"}, codes
    assert "454" in codes and "535" in codes, codes
    assert login(gateway, b"alice", b"secret") == "235"
    assert metric_reaches(gateway, 'smtpgw_auth_total{result="temporary"}', 1) >= 1


@pytest.mark.parametrize("replacement", ["fifo", "dev-zero"])
def test_users_file_replaced_by_a_fifo_or_dev_zero(start_gateway, users, tmp_path, replacement):
    gateway = plain_auth_gateway(start_gateway, users)
    assert login(gateway, b"alice", b"secret") == "235"
    users.unlink()
    if replacement == "fifo":
        os.mkfifo(users)
    else:
        os.symlink("/dev/zero", users)
    gateway.send_signal(signal.SIGHUP)
    wait_lines(gateway, lambda p: "AUTH users file refused" in p.get("message", ""))
    # Still serving, with the users in force.
    assert login(gateway, b"alice", b"secret") == "235"
    assert gateway.proc.poll() is None


def test_plaintext_auth_behind_proxy_only_for_a_loopback_client(start_gateway, users):
    # A balancer on this host forwards remote clients to a loopback --proxy-listen:
    # their credentials crossed the network in the clear, so they get no AUTH before
    # TLS; a client on this host (per the header) and --listen keep it.
    gateway = plain_auth_gateway(
        start_gateway, users, "--proxy-protocol", "v2", "--proxy-trusted-cidr", "127.0.0.1/32",
        "--proxy-listen", "127.0.0.1:0",
    )
    port = listener_port(gateway, "ProxiedSmtp")
    for source, offered in [("203.0.113.9", False), ("127.0.0.1", True)]:
        with wire_from(gateway, "127.0.0.1", port) as w:
            w.send(v2_tcp4(source, 40001))
            w.reply()
            assert ("AUTH PLAIN LOGIN" in w.cmd("EHLO client.test").text) == offered, source
            assert_reply(w.cmd(plain(b"alice", b"secret")), "235" if offered else "538 5.7.11")
    assert login(gateway, b"alice", b"secret") == "235"


def test_sigterm_during_verification_answers_the_verdict_then_drains(start_gateway, users):
    # 40 verifications queued (about half a second of argon2 on two threads), then
    # SIGTERM: each client gets its verdict or the drain's 421, never silence, and the
    # gateway exits in time and cleanly.
    gateway = plain_auth_gateway(start_gateway, users, "--max-auth-failures-per-ip", "0")
    wires = []
    try:
        for _ in range(40):
            w = Wire(gateway.host, gateway.port)
            w.reply()
            w.cmd("EHLO client.test")
            wires.append(w)
        for w in wires:
            w.send(plain(b"alice", b"secret") + "\r\n")
        started = time.monotonic()
        gateway.send_signal(signal.SIGTERM)
        codes = [str(w.reply().code) for w in wires]
    finally:
        for w in wires:
            w.close()
    assert set(codes) <= {"235", "454", "421"} and "235" in codes, codes
    assert gateway.wait(30) == 0
    assert time.monotonic() - started < 30
