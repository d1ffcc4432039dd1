// yamuxpeer: a baton protocol peer built on Go's crypto/tls and
// hashicorp/yamux, code this project did not write, for interop tests
// (tests/integration/test_interop_go.py, tests/interop/README.md).
//
//	yamuxpeer client --server HOST:PORT --ca FILE --token T --scenario S [...]
//	yamuxpeer server --listen 127.0.0.1:0 --cert F --key F [...]
//	yamuxpeer certs --out DIR        (an RSA CA and server certificate)
//
// Output: JSON lines on stdout. The client prints event lines
// ({"event":"streaming"}, {"event":"drain"}, ...) and ends with one
// {"event":"result","ok":...} line; it exits 0 only when every check of the
// scenario passed. The server prints {"event":"ready","listen":...} and then
// one line per session and per stream. Logs (and yamux's own) go to stderr.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
)

var outMu sync.Mutex

// emit prints one JSON line on stdout (os.Stdout is unbuffered).
func emit(v interface{}) {
	b, err := json.Marshal(v)
	if err != nil {
		b = []byte(fmt.Sprintf(`{"event":"error","error":%q}`, err.Error()))
	}
	outMu.Lock()
	os.Stdout.Write(append(b, '\n'))
	outMu.Unlock()
}

func logf(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "yamuxpeer: "+format+"\n", a...)
}

func fatalf(code int, format string, a ...interface{}) {
	logf(format, a...)
	os.Exit(code)
}

// OpenSSL names (as baton's docs and docs/protocol.md spell them) -> Go suites.
var suites = map[string]uint16{
	"ECDHE-ECDSA-AES128-GCM-SHA256": tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	"ECDHE-ECDSA-AES256-GCM-SHA384": tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	"ECDHE-ECDSA-CHACHA20-POLY1305": tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
	"ECDHE-RSA-AES128-GCM-SHA256":   tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
	"ECDHE-RSA-AES256-GCM-SHA384":   tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
	"ECDHE-RSA-CHACHA20-POLY1305":   tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
}

func suiteName(id uint16) string {
	for k, v := range suites {
		if v == id {
			return k
		}
	}
	return tls.CipherSuiteName(id)
}

func suiteNames() string {
	var n []string
	for k := range suites {
		n = append(n, k)
	}
	sort.Strings(n)
	return strings.Join(n, ", ")
}

func certPool(file string) *x509.CertPool {
	pem, err := os.ReadFile(file)
	if err != nil {
		fatalf(2, "reading CA %s: %v", file, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		fatalf(2, "no certificate in %s", file)
	}
	return pool
}

func tlsVersionName(v uint16) string {
	switch v {
	case tls.VersionTLS12:
		return "TLSv1.2"
	case tls.VersionTLS13:
		return "TLSv1.3"
	}
	return fmt.Sprintf("0x%04x", v)
}

func main() {
	if len(os.Args) < 2 {
		fatalf(2, "usage: yamuxpeer client|server|certs [flags] (-h for the flags)")
	}
	switch os.Args[1] {
	case "client":
		os.Exit(runClient(os.Args[2:]))
	case "server":
		os.Exit(runServer(os.Args[2:]))
	case "certs":
		os.Exit(runCerts(os.Args[2:]))
	default:
		fatalf(2, "unknown mode %q: client, server or certs", os.Args[1])
	}
}
