package main

// `yamuxpeer certs --out DIR`: an RSA CA and an RSA server certificate for
// localhost / 127.0.0.1 (ca.crt, ca.key, server.crt, server.key, PEM), so the
// tests can run `baton serve` with an RSA key and try the ECDHE-RSA suites
// without depending on the openssl command.

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

func writePEM(path, typ string, der []byte) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0600)
	if err != nil {
		fatalf(1, "%v", err)
	}
	defer f.Close()
	if err := pem.Encode(f, &pem.Block{Type: typ, Bytes: der}); err != nil {
		fatalf(1, "%v", err)
	}
}

func runCerts(args []string) int {
	fs := flag.NewFlagSet("certs", flag.ExitOnError)
	out := fs.String("out", "", "directory to write ca.crt, ca.key, server.crt, server.key")
	bits := fs.Int("rsa-bits", 2048, "RSA key size")
	fs.Parse(args)
	if *out == "" {
		fatalf(2, "certs: --out is required")
	}
	os.MkdirAll(*out, 0700)
	now := time.Now()
	caKey, err := rsa.GenerateKey(rand.Reader, *bits)
	if err != nil {
		fatalf(1, "%v", err)
	}
	ca := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "yamuxpeer test RSA CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(7 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		fatalf(1, "%v", err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	key, err := rsa.GenerateKey(rand.Reader, *bits)
	if err != nil {
		fatalf(1, "%v", err)
	}
	leaf := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "localhost"},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(7 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, leaf, caCert, &key.PublicKey, caKey)
	if err != nil {
		fatalf(1, "%v", err)
	}
	caKeyDER, _ := x509.MarshalPKCS8PrivateKey(caKey)
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	writePEM(filepath.Join(*out, "ca.crt"), "CERTIFICATE", caDER)
	writePEM(filepath.Join(*out, "ca.key"), "PRIVATE KEY", caKeyDER)
	writePEM(filepath.Join(*out, "server.crt"), "CERTIFICATE", der)
	writePEM(filepath.Join(*out, "server.key"), "PRIVATE KEY", keyDER)
	return 0
}
