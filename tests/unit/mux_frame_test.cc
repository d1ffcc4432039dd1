// placeholder: tests for mux_frame
