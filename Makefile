# Thin wrapper around meson/ninja. Every target installs what it needs first,
# so a fresh Debian 12 machine needs only `make run` or `make test`.
BUILD   ?= build
ASAN    ?= build-asan
TSAN    ?= build-tsan
FUZZ    ?= build-fuzz
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?=
# What the image ships (sidecar/Dockerfile) is what the tests run.
MESON_OPTS ?= --buildtype=release

.PHONY: all deps test-deps build asan tsan test-needs-asan test-needs-tsan run test test-unit test-integration fuzz bench clean

all: build

deps:
	@scripts/deps.sh

# make test also checks the manifests in k8s/: kubectl, Node.js, and the
# validator's npm packages in tests/k8s (not needed to build).
test-deps:
	@scripts/deps.sh --k8s

$(BUILD)/build.ninja:
	meson setup $(BUILD) $(MESON_OPTS)

build: deps $(BUILD)/build.ninja
	ninja -C $(BUILD)

$(ASAN)/build.ninja:
	meson setup $(ASAN) --buildtype=debug -Db_sanitize=address,undefined -Db_lundef=false

asan: deps $(ASAN)/build.ninja
	ninja -C $(ASAN)

# ThreadSanitizer: the admin HTTP threads beside the event loop (scripts/test.sh
# runs the tests on it with TSAN_OPTIONS=suppressions=tests/tsan.supp).
$(TSAN)/build.ninja:
	meson setup $(TSAN) --buildtype=debug -Db_sanitize=thread

tsan: deps $(TSAN)/build.ninja
	ninja -C $(TSAN)

# Only what scripts/test.sh runs (the binary, unit tests, two bench tools).
test-needs-asan: deps $(ASAN)/build.ninja
	ninja -C $(ASAN) test-needs

test-needs-tsan: deps $(TSAN)/build.ninja
	ninja -C $(TSAN) test-needs

run: build
	@scripts/demo.sh $(BUILD)

test: build test-deps
	@scripts/test.sh $(BUILD)

# libFuzzer targets (clang, ASan + UBSan) over their seed corpora: tests/fuzz/run.sh,
# FUZZ_SECONDS each; FUZZ_TARGETS="mux_session config" runs only those.
fuzz: deps
	@FUZZ_BUILD=$(FUZZ) tests/fuzz/run.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

bench: build
	@bench/run.sh $(BUILD)
	@bench/restart.py $(BUILD)
	@bench/storm.py $(BUILD)
	@bench/resume.py $(BUILD)
	@bench/peers.py $(BUILD)

clean:
	rm -rf $(BUILD) $(ASAN) $(TSAN) $(FUZZ)
