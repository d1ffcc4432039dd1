// placeholder: tests for tls_record
