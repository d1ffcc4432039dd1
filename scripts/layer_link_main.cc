// The link half of the layer check (meson.build, layer_link_*): each layer's
// library, every object kept, linked with only the libraries it may use.
// Never run; the link fails on a call into a folder above.
int main() { return 0; }
