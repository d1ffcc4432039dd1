// placeholder: tests for mux_control
