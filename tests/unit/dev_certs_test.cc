// placeholder: tests for dev_certs
