// placeholder: tests for mux_session
