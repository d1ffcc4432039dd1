"""Certificate files (issue 17 item 8; docs/configuration.md "Certificate
checks", docs/security.md "Certificates").

- A path that is not a readable regular file (a directory, a FIFO) as
  tls.cert, tls.key, tls.client_ca or tls.ticket_key is refused by `baton
  check` and `baton serve` with file:line:column, the key and the path; no
  crash (it was an abort under ASan, "Memory allocation failed" without), no
  hang on a FIFO. The same for `baton connect --cert/--key/--ca`.
- Certificates that load but that peers refuse (expired, not yet valid,
  RSA-1024, signed with SHA-1), made here with the openssl command: `baton
  check` prints a warning naming the key and the certificate and exits 0,
  or 1 with --strict; `baton serve` starts, logs the warning, and exports
  baton_tls_certificate_expiry_seconds{cert=...} (notAfter, unix time).
"""

from __future__ import annotations

import calendar
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import TOKEN_SHA256, Admin, ServerProcess, _teardown, scaled

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

CA_CNF = """[ca]
default_ca = d
[d]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = p
copy_extensions = copy
unique_subject = no
[p]
commonName = supplied
"""


def openssl(d: Path, *args):
    r = subprocess.run(["openssl", *map(str, args)], cwd=d, capture_output=True, timeout=60)
    assert r.returncode == 0, (args, r.stderr.decode())
    return r.stdout


def ec_request(d: Path, name: str):
    openssl(d, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", name + ".key", "-out", name + ".csr", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1")


def dated_self_signed(d: Path, name: str, start: str, end: str):
    """A self-signed P-256 certificate valid from start to end (YYYYMMDDHHMMSSZ)."""
    (d / "ca.cnf").write_text(CA_CNF)
    (d / "index.txt").write_text("")
    (d / "serial").write_text("01\n")
    ec_request(d, name)
    openssl(d, "ca", "-batch", "-config", "ca.cnf", "-selfsign", "-keyfile", name + ".key", "-in", name + ".csr",
            "-startdate", start, "-enddate", end, "-out", name + ".crt", "-notext")
    return d / (name + ".crt"), d / (name + ".key")


@pytest.fixture(scope="module")
def bad_certs(certs, tmp_path_factory):
    """name -> (cert, key, what the warning says) for certificates peers refuse."""
    d = tmp_path_factory.mktemp("bad-certs")
    out = {}
    c, k = dated_self_signed(d, "expired", "20200101000000Z", "20200201000000Z")
    out["expired"] = (c, k, 'certificate "CN=localhost" expired on 2020-02-01 00:00:00 UTC')
    c, k = dated_self_signed(d, "future", "20990101000000Z", "21000101000000Z")
    out["not_yet_valid"] = (c, k, 'certificate "CN=localhost" is not valid before 2099-01-01 00:00:00 UTC')
    openssl(d, "req", "-x509", "-newkey", "rsa:1024", "-nodes", "-keyout", "rsa1024.key", "-out", "rsa1024.crt",
            "-subj", "/CN=localhost", "-days", "30")
    out["rsa1024"] = (d / "rsa1024.crt", d / "rsa1024.key",
                      'certificate "CN=localhost" has a weak key: RSA with 1024 bits (at least 2048 needed)')
    ec_request(d, "sha1")
    openssl(d, "x509", "-req", "-in", "sha1.csr", "-CA", certs.ca_crt, "-CAkey", certs.ca_key, "-CAcreateserial",
            "-sha1", "-days", "30", "-out", "sha1.crt")
    out["sha1"] = (d / "sha1.crt", d / "sha1.key", 'certificate "CN=localhost" is signed with SHA-1')
    return out


def not_after(cert: Path) -> int:
    line = openssl(cert.parent, "x509", "-in", cert, "-noout", "-enddate").decode().strip()
    return calendar.timegm(time.strptime(line.split("=", 1)[1], "%b %d %H:%M:%S %Y %Z"))


def write_config(path: Path, cert, key, client_ca=None, ticket_key=None, handoff=None) -> Path:
    lines = ["listen: 127.0.0.1:0", "tls:", "  cert: %s" % cert, "  key: %s" % key]
    if client_ca:
        lines.append("  client_ca: %s" % client_ca)
    if ticket_key:
        lines.append("  ticket_key: %s" % ticket_key)
    lines += ["auth:", "  tokens:", "    - name: t", "      sha256: %s" % TOKEN_SHA256, "routes:",
              "  echo: 127.0.0.1:9", "admin:", "  listen: 127.0.0.1:0",
              "handoff:", "  socket: %s" % (handoff or "/tmp/baton-cert-files-%d.sock" % os.getpid())]
    path.write_text("\n".join(lines) + "\n")
    return path


def check(baton_bin, cfg, *extra):
    return subprocess.run([baton_bin, "check", "-c", str(cfg), *extra], capture_output=True, timeout=scaled(60))


def assert_no_crash(r):
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode >= 0, "killed by signal %d: %s" % (-r.returncode, err)
    for marker in ("AddressSanitizer", "LeakSanitizer", "runtime error:", "Memory allocation failed",
                   "terminate called"):
        assert marker not in err, err


# --- paths that are not regular files ---------------------------------------------------------------

@pytest.mark.parametrize("key", ["cert", "key", "client_ca", "ticket_key"])
def test_a_directory_is_refused_with_the_key_and_the_path(baton_bin, certs, tmp_path, key):
    files = {"cert": certs.server_crt, "key": certs.server_key, "client_ca": certs.ca_crt,
             "ticket_key": certs.ticket_key}
    files[key] = tmp_path  # a directory
    cfg = write_config(tmp_path / "baton.yaml", files["cert"], files["key"], files["client_ca"], files["ticket_key"])
    line = 1 + next(i for i, l in enumerate(cfg.read_text().splitlines()) if l.strip().startswith(key + ":"))
    column = 5 + len(key)  # "  key: " then the value
    want = "%s:%d:%d: tls.%s: %s: is a directory" % (cfg, line, column, key, tmp_path)
    r = check(baton_bin, cfg)
    assert_no_crash(r)
    assert r.returncode == 2, r
    err = r.stderr.decode()
    assert err.startswith(want), err
    assert err.count("\n") == 1, err
    r = subprocess.run([baton_bin, "serve", "-c", str(cfg)], capture_output=True, timeout=scaled(60))
    assert_no_crash(r)
    assert r.returncode == 2, r
    assert want in r.stderr.decode(), r.stderr
    assert not r.stdout.strip(), "printed a ready line: %r" % r.stdout


def test_a_fifo_is_refused_not_waited_on(baton_bin, certs, tmp_path):
    fifo = tmp_path / "cert.fifo"
    os.mkfifo(fifo)
    cfg = write_config(tmp_path / "baton.yaml", fifo, certs.server_key)
    r = check(baton_bin, cfg)  # would block forever in open() or read()
    assert_no_crash(r)
    assert r.returncode == 2, r
    assert "tls.cert: %s: is a FIFO, not a regular file" % fifo in r.stderr.decode(), r.stderr


def test_an_unreadable_file_is_refused(baton_bin, certs, tmp_path):
    """A key the process may not read is refused with the reason. Root reads
    a file of mode 0, so as root the check runs as user nobody, over copies
    in a directory nobody may enter (the key alone is unreadable)."""
    as_nobody = os.geteuid() == 0
    d = Path(tempfile.mkdtemp(prefix="baton-unreadable-")) if as_nobody else tmp_path
    try:
        d.chmod(0o755)
        crt = d / "server.crt"
        crt.write_bytes(certs.server_crt.read_bytes())
        crt.chmod(0o644)
        key = d / "server.key"
        key.write_bytes(certs.server_key.read_bytes())
        key.chmod(0)
        cfg = write_config(d / "baton.yaml", crt, key)
        cfg.chmod(0o644)

        def drop_to_nobody():
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)

        r = subprocess.run([baton_bin, "check", "-c", str(cfg)], capture_output=True, timeout=scaled(60),
                           preexec_fn=drop_to_nobody if as_nobody else None)
        assert_no_crash(r)
        assert r.returncode == 2, r
        assert "tls.key: %s: cannot open it: Permission denied" % key in r.stderr.decode(), r.stderr
    finally:
        if as_nobody:
            shutil.rmtree(d)


@pytest.mark.parametrize("flag", ["--cert", "--ca"])
def test_connect_refuses_a_directory(baton_bin, certs, tmp_path, flag):
    args = [baton_bin, "connect", "--server", "127.0.0.1:9", "--forward", "127.0.0.1:0=echo", "--token", "t",
            "--ca", str(certs.ca_crt), "--cert", str(certs.client_crt), "--key", str(certs.client_key)]
    args[args.index(flag) + 1] = str(tmp_path)
    r = subprocess.run(args, capture_output=True, timeout=scaled(60))
    assert_no_crash(r)
    assert r.returncode == 2, r
    assert "%s: is a directory, not a file" % tmp_path in r.stderr.decode(), r.stderr


# --- certificates peers refuse --------------------------------------------------------------------

def test_check_is_quiet_about_good_certificates(baton_bin, certs, tmp_path):
    cfg = write_config(tmp_path / "baton.yaml", certs.server_crt, certs.server_key, client_ca=certs.ca_crt)
    r = check(baton_bin, cfg, "--strict")
    assert r.returncode == 0, r
    assert b"warning" not in r.stderr and b"warning" not in r.stdout, r


@pytest.mark.parametrize("kind", ["expired", "not_yet_valid", "rsa1024", "sha1"])
def test_check_warns_about_a_certificate_peers_refuse(baton_bin, bad_certs, tmp_path, kind):
    crt, key, says = bad_certs[kind]
    cfg = write_config(tmp_path / "baton.yaml", crt, key)
    r = check(baton_bin, cfg)
    assert r.returncode == 0, r  # loads: a warning, not an error
    err = r.stderr.decode()
    assert err.startswith("warning: %s:3:9: tls.cert: %s: %s" % (cfg, crt, says)), err
    assert err.count("warning:") == 1, err
    assert r.stdout.decode().rstrip().endswith(", 1 warning(s)"), r.stdout
    r = check(baton_bin, cfg, "--strict")
    assert r.returncode == 1, r
    assert says in r.stderr.decode(), r.stderr


def test_check_warns_about_an_expired_client_ca(baton_bin, certs, bad_certs, tmp_path):
    ca, _, says = bad_certs["expired"]
    cfg = write_config(tmp_path / "baton.yaml", certs.server_crt, certs.server_key, client_ca=ca)
    r = check(baton_bin, cfg)
    assert r.returncode == 0, r
    err = r.stderr.decode()
    assert "tls.client_ca: %s: %s: peer certificates that chain to it are refused" % (ca, says) in err, err


def test_serve_starts_warns_and_exports_the_expiry(request, baton_bin, certs, bad_certs, tmp_path):
    crt, key, says = bad_certs["expired"]
    cfg = write_config(tmp_path / "baton.yaml", crt, key, client_ca=certs.ca_crt,
                       handoff=str(tmp_path / "h.sock") if len(str(tmp_path)) < 90 else None)
    srv = ServerProcess(cfg, tmp_path, cfg.read_text(), name="server")
    request.node._baton_procs = [srv]
    try:
        srv.wait_ready()  # an expired certificate does not stop a (re)start
        m = Admin(srv).metrics()
        assert m.families["baton_tls_certificate_expiry_seconds"].type == "gauge"
        assert m.get("baton_tls_certificate_expiry_seconds", cert="server") == not_after(crt) == 1580515200
        assert m.get("baton_tls_certificate_expiry_seconds", cert="client_ca") == not_after(certs.ca_crt)
        err = srv.stderr_text()
        assert re.search(r" warning %s:3:9: tls\.cert: %s: %s: TLS peers" % (re.escape(str(cfg)), re.escape(str(crt)),
                                                                             re.escape(says)), err), err
    finally:
        _teardown([srv])


def test_serve_with_good_certificates_exports_their_expiry(server, certs):
    m = Admin(server).metrics()
    assert m.get("baton_tls_certificate_expiry_seconds", cert="server") == not_after(certs.server_crt)
    assert m.get("baton_tls_certificate_expiry_seconds", cert="client_ca") is None  # no tls.client_ca
    assert "tls.cert" not in server.stderr_text()
