// placeholder: tests for config
