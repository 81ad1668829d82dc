# cc-proxy: build, test, install and package.
#
#   make                 release build of the whole workspace, then the stripped binary and its debug info
#   make test            lint, unit + integration tests, 20 s of fuzzing per target, the VM tests, then the
#                        system test
#   make fuzz            every fuzz target for FUZZ_SECONDS (default 60) each (nightly + cargo-fuzz)
#   make install         PREFIX=/usr/local DESTDIR= : stripped binary (+ debug info), systemd units,
#                        SELinux module (if built), docs and the Grafana dashboard. It installs what `make`
#                        built and runs cargo only when the binary is missing or older than its sources, so
#                        `make && sudo make install` works without cargo on root's PATH.
#   make package         target/package/cc-proxy-<version>.tar.gz
#   make selinux         selinux/cc-proxy.pp (needs selinux-policy-dev, or checkpolicy + semodule-utils)
#   make system-test     install and run under systemd and SELinux in a booted Debian guest (tests/system)
#   make demo | bench | bench-quick | vm-test | lint | clean

CARGO   ?= cargo
PREFIX  ?= /usr/local
DESTDIR ?=
BINDIR  ?= $(PREFIX)/bin
DOCDIR  ?= $(PREFIX)/share/doc/cc-proxy
# systemd only looks for units in a few places; /etc/systemd/system works for
# any PREFIX (packagers may set UNITDIR=/usr/lib/systemd/system).
UNITDIR ?= /etc/systemd/system
SELINUXDIR ?= $(PREFIX)/share/selinux/packages
# Split debug info goes where gdb looks for it: $(DEBUGDIR)$(BINDIR)/cc-proxy.debug, named by the stripped
# binary's .gnu_debuglink.
DEBUGDIR ?= /usr/lib/debug
SELINUX_DEVEL_MAKEFILE ?= /usr/share/selinux/devel/Makefile
OBJCOPY ?= objcopy
CHECKMODULE ?= checkmodule
SEMODULE_PACKAGE ?= semodule_package

# The version comes from [workspace.package] in Cargo.toml.
VERSION := $(shell sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml)
PKGNAME := cc-proxy-$(VERSION)
PKGDIR  := target/package
RELEASE_BIN ?= target/release/cc-proxy
STRIPPED_BIN := $(RELEASE_BIN).stripped
DEBUG_BIN := $(RELEASE_BIN).debug
# What the daemon binary is built from: when one is newer than it, `make install` rebuilds it.
RUST_SOURCES := $(shell find src api/src protocol/src -name '*.rs' 2>/dev/null) \
	Cargo.toml Cargo.lock api/Cargo.toml protocol/Cargo.toml
# Seconds per fuzz target: `make fuzz` uses FUZZ_SECONDS, `make test` (fuzz-ci) FUZZ_CI_SECONDS.
FUZZ_SECONDS ?= 60
FUZZ_CI_SECONDS ?= 20

UNITS := systemd/cc-proxy.socket systemd/cc-proxy.service

.PHONY: all build split-debug test lint unit-test install install-bin install-units install-docs \
	install-selinux package selinux selinux-fallback selinux-fallback-check demo bench bench-quick vm-test \
	system-test fuzz fuzz-ci clean

all: build

build:
	$(CARGO) build --release --workspace
	@$(MAKE) --no-print-directory split-debug

# The release binary, built only when it is missing or older than its sources. Under sudo, cargo is usually
# not on PATH: then say what to run instead of failing on "cargo: No such file or directory".
$(RELEASE_BIN): $(RUST_SOURCES)
	@if ! command -v $(CARGO) >/dev/null 2>&1; then \
		echo "$@ is missing or older than its sources, and $(CARGO) is not on PATH (sudo resets PATH)."; \
		echo "Build it as yourself first: make && sudo make install"; \
		exit 1; \
	fi
	@echo "$@ is missing or older than its sources: building it"
	$(CARGO) build --release -p cc-proxy
	@touch $@

# What is installed: the binary without symbols or debug sections, and its debug info beside it.
split-debug: $(STRIPPED_BIN) $(DEBUG_BIN)

$(DEBUG_BIN): $(RELEASE_BIN)
	$(OBJCOPY) --only-keep-debug $< $@.tmp
	@mv $@.tmp $@

$(STRIPPED_BIN): $(RELEASE_BIN) $(DEBUG_BIN)
	cd $(dir $@) && $(OBJCOPY) --strip-all --add-gnu-debuglink=$(notdir $(DEBUG_BIN)) $(notdir $<) $(notdir $@).tmp
	@mv $@.tmp $@

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit-test:
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		echo "$(CARGO) nextest run --workspace"; \
		$(CARGO) nextest run --workspace; \
	else \
		echo "cargo-nextest not installed; using cargo test"; \
		$(CARGO) test --workspace; \
	fi

test: lint unit-test fuzz-ci
	@if [ -f tests/vm/run.sh ]; then \
		$(MAKE) vm-test; \
	else \
		echo "tests/vm/run.sh not present; skipping vm-test"; \
	fi
	$(MAKE) system-test

# Installs into $(DESTDIR)$(PREFIX) (binary, docs, SELinux module), $(DESTDIR)$(DEBUGDIR) (debug info) and
# $(DESTDIR)$(UNITDIR) (units, with @BINDIR@/@DOCDIR@ substituted). Nothing is built unless it is missing or
# out of date (see $(RELEASE_BIN) above).
install: install-bin install-units install-docs install-selinux

install-bin: $(STRIPPED_BIN) $(DEBUG_BIN)
	@echo "installing $(STRIPPED_BIN) (stripped $(RELEASE_BIN)) and its debug info"
	install -d -m 0755 $(DESTDIR)$(BINDIR) $(DESTDIR)$(DEBUGDIR)$(BINDIR)
	install -m 0755 $(STRIPPED_BIN) $(DESTDIR)$(BINDIR)/cc-proxy
	install -m 0644 $(DEBUG_BIN) $(DESTDIR)$(DEBUGDIR)$(BINDIR)/cc-proxy.debug

install-units:
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	@for unit in $(UNITS); do \
		dest=$(DESTDIR)$(UNITDIR)/$$(basename $$unit); \
		echo "install $$unit -> $$dest"; \
		sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@DOCDIR@|$(DOCDIR)|g' $$unit > $$dest || exit 1; \
		chmod 0644 $$dest; \
	done

install-docs:
	install -d -m 0755 $(DESTDIR)$(DOCDIR)
	@for doc in docs/*.md README.md CHANGELOG.md selinux/README.md; do \
		[ -f $$doc ] || continue; \
		case $$doc in selinux/*) dest=selinux-README.md ;; *) dest=$$(basename $$doc) ;; esac; \
		install -m 0644 $$doc $(DESTDIR)$(DOCDIR)/$$dest; \
	done
	install -d -m 0755 $(DESTDIR)$(DOCDIR)/grafana
	install -m 0644 docs/grafana/*.json $(DESTDIR)$(DOCDIR)/grafana/

install-selinux:
	@if [ -f selinux/cc-proxy.pp ]; then \
		install -d -m 0755 $(DESTDIR)$(SELINUXDIR); \
		install -m 0644 selinux/cc-proxy.pp selinux/cc-proxy.if $(DESTDIR)$(SELINUXDIR)/; \
		echo "installed $(DESTDIR)$(SELINUXDIR)/cc-proxy.pp"; \
	else \
		echo "selinux/cc-proxy.pp not built (run make selinux first); not installing it"; \
	fi

# A binary tarball laid out like an install with PREFIX=/usr/local.
package: build
	rm -rf $(PKGDIR)/$(PKGNAME)
	$(MAKE) install DESTDIR=$(CURDIR)/$(PKGDIR)/$(PKGNAME) PREFIX=/usr/local
	tar -C $(PKGDIR) -czf $(PKGDIR)/$(PKGNAME).tar.gz $(PKGNAME)
	rm -rf $(PKGDIR)/$(PKGNAME)
	@echo "package: $(PKGDIR)/$(PKGNAME).tar.gz"

# Prefer the refpolicy development Makefile (Debian: selinux-policy-dev). Without it, build from
# selinux/fallback/, the module's sources already expanded by that Makefile (kept in step with them by
# `make selinux-fallback`, checked by `make selinux-fallback-check`), with checkmodule (checkpolicy) and
# semodule_package (semodule-utils) alone.
selinux: selinux/cc-proxy.pp

selinux/cc-proxy.pp: selinux/cc-proxy.te selinux/cc-proxy.fc selinux/cc-proxy.if selinux/fallback/cc-proxy.te.expanded \
		selinux/fallback/cc-proxy.fc.expanded
	@if [ -f $(SELINUX_DEVEL_MAKEFILE) ]; then \
		echo "building $@ with $(SELINUX_DEVEL_MAKEFILE)"; \
		$(MAKE) -C selinux -f $(SELINUX_DEVEL_MAKEFILE) cc-proxy.pp; \
	elif command -v $(CHECKMODULE) >/dev/null && command -v $(SEMODULE_PACKAGE) >/dev/null; then \
		echo "$(SELINUX_DEVEL_MAKEFILE) not found: building $@ from selinux/fallback/ with $(CHECKMODULE)"; \
		mkdir -p selinux/tmp && \
		$(CHECKMODULE) -M -m -o selinux/tmp/cc-proxy.mod selinux/fallback/cc-proxy.te.expanded && \
		$(SEMODULE_PACKAGE) -o $@ -m selinux/tmp/cc-proxy.mod -f selinux/fallback/cc-proxy.fc.expanded; \
	else \
		echo "cannot build $@: install selinux-policy-dev, or checkpolicy and semodule-utils"; exit 1; \
	fi

# Regenerates selinux/fallback/ from the module's sources (needs selinux-policy-dev).
selinux-fallback:
	bash selinux/expand.sh selinux/fallback

# Fails when selinux/fallback/ is not what the module's sources expand to (skipped without the headers).
selinux-fallback-check:
	@if [ -f $(SELINUX_DEVEL_MAKEFILE) ]; then \
		rm -rf selinux/tmp/fallback-check && bash selinux/expand.sh selinux/tmp/fallback-check && \
		if diff -u selinux/fallback selinux/tmp/fallback-check; then \
			echo "selinux/fallback/ matches the module's sources"; \
		else \
			echo "selinux/fallback/ is stale: run make selinux-fallback and commit it"; exit 1; \
		fi; \
	else \
		echo "$(SELINUX_DEVEL_MAKEFILE) not found (selinux-policy-dev): selinux/fallback/ not checked"; \
	fi

demo:
	bash scripts/demo.sh

bench:
	bash benches/run.sh

bench-quick:
	bash benches/run.sh --quick

vm-test:
	bash tests/vm/run.sh

system-test:
	bash tests/system/run.sh

# fuzz/ is its own cargo workspace built with nightly; see docs/reliability.md.
fuzz:
	bash fuzz/run.sh $(FUZZ_SECONDS)

# Skips with the reason printed when the nightly toolchain or cargo-fuzz is missing.
fuzz-ci:
	bash fuzz/run.sh --ci $(FUZZ_CI_SECONDS)

clean:
	$(CARGO) clean
	rm -rf selinux/tmp selinux/cc-proxy.pp
	rm -rf fuzz/target
