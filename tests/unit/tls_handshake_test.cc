// placeholder: tests for tls_handshake
