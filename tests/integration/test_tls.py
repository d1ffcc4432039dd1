"""TLS (docs/protocol.md section 1): versions, suites, curves, tickets, mTLS, ALPN,
and what happens to connections that are not TLS 1.2 at all."""

import os
import socket
import ssl
import subprocess
import types

import pytest

import baton_wire as bw
from conftest import TOKEN, Certs, ServerProcess, _teardown, echo_roundtrip, make_config, scaled
from tcp_relay import TcpRelay

HANDSHAKE_FAILURES = (ssl.SSLError, ConnectionError, EOFError, OSError)


# What the client offers in supported_groups for each key exchange. In TLS 1.2
# that extension also names the curves the client accepts for the server's
# ECDSA certificate (RFC 8422 5.1), so an X25519 client must list P-256 too
# (the dev certificate is ECDSA P-256); the server should then pick X25519.
GROUP_OFFERS = {"P-256": "P-256", "X25519": "X25519:P-256"}


@pytest.mark.parametrize("suite", bw.SUITES)
@pytest.mark.parametrize("curve", bw.CURVES)
def test_suite_and_curve_complete_a_tunnel(server, tunnel_factory, certs, suite, curve):
    ctx = bw.client_context(ca=str(certs.ca_crt), ciphers=suite, curve=GROUP_OFFERS[curve])
    t = tunnel_factory(server, ctx=ctx)
    assert t.ssl.version() == "TLSv1.2"
    assert t.ssl.cipher()[0] == suite
    assert bw.negotiated_group(t.ssl) == {"P-256": "prime256v1", "X25519": "X25519"}[curve]
    assert len(t.session_id) == 16
    data = os.urandom(20_000)
    assert echo_roundtrip(t, data) == data


@pytest.mark.parametrize("ciphers", ["AES128-GCM-SHA256", "AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-SHA",
                                     "ECDHE-ECDSA-AES128-SHA256"])
def test_non_ecdhe_or_non_aead_suites_refused(server, certs, ciphers):
    ctx = bw.client_context(ca=str(certs.ca_crt), ciphers=ciphers)
    with pytest.raises(HANDSHAKE_FAILURES):
        t = bw.Tunnel.open_tls(server.addr, ctx=ctx, timeout=scaled(10))
        t.close()
    assert server.alive()


def test_tls13_only_client_refused(server, certs):
    ctx = bw.client_context(ca=str(certs.ca_crt), min_version=ssl.TLSVersion.TLSv1_3,
                            max_version=ssl.TLSVersion.TLSv1_3)
    with pytest.raises(HANDSHAKE_FAILURES):
        t = bw.Tunnel.open_tls(server.addr, ctx=ctx, timeout=scaled(10))
        t.close()
    assert server.alive()


def test_tls_client_offering_1_2_and_1_3_gets_1_2(server, certs, tunnel_factory):
    ctx = bw.client_context(ca=str(certs.ca_crt), max_version=ssl.TLSVersion.TLSv1_3)
    t = tunnel_factory(server, ctx=ctx)
    assert t.ssl.version() == "TLSv1.2"


def _closed_and_server_fine(server, tunnel_factory, sock):
    closed_at = bw.wait_socket_closed(sock, scaled(15))
    sock.close()
    assert closed_at is not None, "server kept the connection open"
    assert server.alive()
    t = tunnel_factory(server)
    assert echo_roundtrip(t, b"fine") == b"fine"


def test_plain_tcp_garbage_closed_server_survives(server, tunnel_factory):
    s = socket.create_connection(server.addr, timeout=scaled(10))
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(4096))
    except OSError:
        pass
    _closed_and_server_fine(server, tunnel_factory, s)


def test_garbage_handshake_record_closed(server, tunnel_factory):
    """A TLS handshake record header with a nonsense body."""
    s = socket.create_connection(server.addr, timeout=scaled(10))
    try:
        s.sendall(b"\x16\x03\x03\x00\x40" + os.urandom(0x40))
    except OSError:
        pass
    _closed_and_server_fine(server, tunnel_factory, s)


def test_tls10_client_hello_closed(server, tunnel_factory):
    s = socket.create_connection(server.addr, timeout=scaled(10))
    s.sendall(bw.tls10_client_hello())
    _closed_and_server_fine(server, tunnel_factory, s)


def test_tls10_client_hello_gets_alert_not_server_hello(server):
    """The reply to a TLS 1.0 ClientHello, if any, is an alert record (0x15), never a ServerHello."""
    s = socket.create_connection(server.addr, timeout=scaled(10))
    s.sendall(bw.tls10_client_hello())
    data = b""
    s.settimeout(scaled(10))
    try:
        while True:
            b = s.recv(4096)
            if not b:
                break
            data += b
    except (ConnectionResetError, socket.timeout):
        pass
    s.close()
    assert not data or data[0] == 0x15, "reply to a TLS 1.0 ClientHello: %s" % data[:16].hex(" ")


def test_session_ticket_resumption_across_two_processes(server_factory, certs, client_ctx):
    a = server_factory(ticket_key=str(certs.ticket_key))
    b = server_factory(ticket_key=str(certs.ticket_key))
    t1 = bw.Tunnel.connect(a.addr, token=TOKEN.encode(), ctx=client_ctx)
    try:
        assert not t1.ssl.session_reused
        sess = t1.ssl.session
        assert sess is not None and sess.has_ticket, "server A issued no session ticket"
    finally:
        t1.close()
    t2 = bw.Tunnel.connect(b.addr, token=TOKEN.encode(), ctx=client_ctx, session=sess)
    try:
        assert t2.ssl.session_reused, "server B did not resume server A's ticket"
        assert len(t2.session_id) == 16
        assert echo_roundtrip(t2, b"resumed") == b"resumed"
    finally:
        t2.close()


def test_session_ticket_not_accepted_with_another_key(server_factory, certs, client_ctx, tmp_path):
    other = tmp_path / "other-ticket.key"
    other.write_text(os.urandom(32).hex() + "\n")
    os.chmod(other, 0o600)
    a = server_factory(ticket_key=str(certs.ticket_key))
    c = server_factory(ticket_key=str(other))
    t1 = bw.Tunnel.connect(a.addr, token=TOKEN.encode(), ctx=client_ctx)
    sess = t1.ssl.session
    t1.close()
    assert sess.has_ticket
    t2 = bw.Tunnel.connect(c.addr, token=TOKEN.encode(), ctx=client_ctx, session=sess)
    try:
        assert not t2.ssl.session_reused  # full handshake instead, still works
        assert echo_roundtrip(t2, b"full") == b"full"
    finally:
        t2.close()


def test_mtls_client_without_cert_fails(server_factory, certs, client_ctx):
    srv = server_factory(mtls=True)
    with pytest.raises(HANDSHAKE_FAILURES + (TimeoutError,)):
        t = bw.Tunnel.connect(srv.addr, token=TOKEN.encode(), ctx=client_ctx, timeout=scaled(10))
        t.close()
    assert srv.alive()


def test_mtls_server_answers_a_missing_client_cert_with_handshake_failure(server_factory, client_ctx):
    """RFC 5246 7.4.6: a server that requires a client certificate answers an
    empty one with a fatal handshake_failure alert, not a bare TCP close."""
    srv = server_factory(mtls=True)
    with pytest.raises(ssl.SSLError) as e:
        t = bw.Tunnel.connect(srv.addr, token=TOKEN.encode(), ctx=client_ctx, timeout=scaled(10))
        t.close()
    assert "handshake failure" in str(e.value).lower() or "alert number 40" in str(e.value).lower(), e.value
    assert srv.alive()


def test_connect_without_client_cert_says_the_server_requires_one(server_factory, connect_factory):
    srv = server_factory(mtls=True)
    c = connect_factory(srv, wait=False)  # no --cert/--key
    status = c.wait_exit(15)
    assert status == 1, "exit status %s" % status
    err = c.stderr_text()
    assert "the server requires a client certificate (--cert/--key)" in err, err
    assert "tunnel closed:" in err, err


def test_connect_without_client_cert_to_a_server_that_just_closes(server_factory, connect_factory):
    """A server that sends no alert (an older baton, another implementation):
    the client still names the missing certificate. The relay forwards
    bytes until the server's alert, which it drops, then closes."""
    srv = server_factory(mtls=True)

    class AlertDropper(TcpRelay):
        @staticmethod
        def _pipe(src, dst):
            try:
                while True:
                    data = src.recv(65536)
                    # A TLS alert record (type 21) from the server ends the
                    # connection without being passed on.
                    if not data or data[:1] == b"\x15":
                        for sock in (src, dst):
                            try:
                                sock.shutdown(socket.SHUT_RDWR)
                            except OSError:
                                pass
                        return
                    dst.sendall(data)
            except OSError:
                return

    relay = AlertDropper(srv.addr, forward=None)
    try:
        c = connect_factory(types.SimpleNamespace(addr=relay.addr), wait=False)
        status = c.wait_exit(15)
    finally:
        relay.close()
    assert status == 1, "exit status %s" % status
    err = c.stderr_text()
    assert ("the server requires a client certificate (--cert/--key): it asked for one, none is configured, "
            "and it closed the connection") in err, err


def test_mtls_client_with_cert_succeeds(server_factory, certs, tunnel_factory):
    srv = server_factory(mtls=True)
    ctx = bw.client_context(ca=str(certs.ca_crt), cert=str(certs.client_crt), key=str(certs.client_key))
    t = tunnel_factory(srv, ctx=ctx)
    assert len(t.session_id) == 16
    assert echo_roundtrip(t, b"mtls") == b"mtls"


def test_alpn_baton1_accepted(server, certs, tunnel_factory):
    ctx = bw.client_context(ca=str(certs.ca_crt), alpn=["baton/1"])
    t = tunnel_factory(server, ctx=ctx)
    assert t.ssl.selected_alpn_protocol() == "baton/1"
    assert echo_roundtrip(t, b"alpn") == b"alpn"


def test_no_alpn_is_fine(server, tunnel_factory):
    t = tunnel_factory(server)
    assert t.ssl.selected_alpn_protocol() is None
    assert echo_roundtrip(t, b"no alpn") == b"no alpn"


def test_server_certificate_verifies_against_dev_ca(server, certs):
    ctx = bw.client_context(ca=str(certs.ca_crt))
    for name in ("localhost", "127.0.0.1"):
        t = bw.Tunnel.open_tls(server.addr, ctx=ctx, server_name=name, timeout=scaled(10))
        cert = t.ssl.getpeercert()
        t.close()
        assert cert


# Certificates for an IP address (iPAddress SubjectAltName): mbedTLS 2.28
# matches DNS names only, so baton matches IP literals itself (tls/cert_names.h).

@pytest.fixture
def ip_certs(baton_bin, tmp_path):
    d = tmp_path / "ip-certs"
    r = subprocess.run([baton_bin, "certs", "--out", str(d), "--ip", "127.0.0.1"], capture_output=True,
                       timeout=scaled(60))
    assert r.returncode == 0, r.stderr
    return Certs(d, d / "ca.crt", d / "ca.key", d / "server.crt", d / "server.key", d / "client.crt",
                 d / "client.key", d / "ticket.key")


@pytest.fixture
def ip_server(request, ip_certs, echo_server, tmp_path, short_tmp):
    """`baton serve` with the certificates of `baton certs --ip 127.0.0.1`."""
    text = make_config(ip_certs, {"echo": echo_server.addr_str}, str(short_tmp / "h.sock"))
    path = tmp_path / "ip-server.yaml"
    path.write_text(text)
    srv = ServerProcess(path, tmp_path, text, name="ip-server")
    request.node._baton_procs = getattr(request.node, "_baton_procs", []) + [srv]
    try:
        srv.wait_ready()
        yield srv
    finally:
        _teardown([srv])


def _connect_echo(c):
    s = socket.create_connection(c.forward_addr("echo"), timeout=scaled(10))
    try:
        s.sendall(b"by IP")
        got = b""
        while len(got) < 5:
            b = s.recv(100)
            assert b, "forward closed"
            got += b
        return got
    finally:
        s.close()


@pytest.mark.parametrize("server_name", [None, "127.0.0.1"])
def test_connect_verifies_a_certificate_by_ip_address(ip_server, ip_certs, connect_factory, server_name):
    extra = ["--ca", str(ip_certs.ca_crt)] + (["--server-name", server_name] if server_name else [])
    c = connect_factory(ip_server, ca=False, extra_args=extra)  # --server 127.0.0.1:PORT
    assert ("--server-name" in c.args) == bool(server_name), c.args
    assert _connect_echo(c) == b"by IP"


def test_connect_refuses_a_certificate_for_another_ip_address(ip_server, ip_certs, connect_factory):
    # The certificate names 127.0.0.1 (and ::1, localhost); 127.0.0.2 is
    # loopback too, so dialing it reaches the same server.
    relay = TcpRelay(ip_server.addr, host="127.0.0.2", forward=None)
    try:
        c = connect_factory(types.SimpleNamespace(addr=relay.addr), ca=False, wait=False,
                            extra_args=["--ca", str(ip_certs.ca_crt)])
        status = c.wait_exit(15)
    finally:
        relay.close()
    assert status == 1, "exit status %s" % status
    err = c.stderr_text()
    assert "server certificate does not name 127.0.0.2 (it names DNS localhost, IP 127.0.0.1, IP ::1)" in err, err

    c = connect_factory(ip_server, ca=False, wait=False,
                        extra_args=["--ca", str(ip_certs.ca_crt), "--server-name", "10.0.0.1"])
    assert c.wait_exit(15) == 1
    err = c.stderr_text()
    assert "server certificate does not name 10.0.0.1 (it names DNS localhost, IP 127.0.0.1, IP ::1)" in err, err


def test_connect_dns_name_mismatch_names_the_expected_name(server, connect_factory, certs):
    c = connect_factory(server, ca=False, wait=False,
                        extra_args=["--ca", str(certs.ca_crt), "--server-name", "other.example"])
    assert c.wait_exit(15) == 1
    err = c.stderr_text()
    assert "server certificate does not name other.example (it names DNS localhost, IP 127.0.0.1, IP ::1)" in err, err
