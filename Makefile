# cc-proxy: build, test, install and package.
#
#   make                 release build of the whole workspace
#   make test            lint, unit + integration tests, 20 s of fuzzing per target, then the VM tests if present
#   make fuzz            every fuzz target for FUZZ_SECONDS (default 60) each (nightly + cargo-fuzz)
#   make install         PREFIX=/usr/local DESTDIR= : binary, systemd units, SELinux module (if built), docs
#   make package         target/package/cc-proxy-<version>.tar.gz
#   make selinux         selinux/cc-proxy.pp (needs selinux-policy-dev, or checkpolicy + semodule-utils)
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
SELINUX_DEVEL_MAKEFILE ?= /usr/share/selinux/devel/Makefile

# The version comes from [workspace.package] in Cargo.toml.
VERSION := $(shell sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml)
PKGNAME := cc-proxy-$(VERSION)
PKGDIR  := target/package
RELEASE_BIN ?= target/release/cc-proxy
# Seconds per fuzz target: `make fuzz` uses FUZZ_SECONDS, `make test` (fuzz-ci) FUZZ_CI_SECONDS.
FUZZ_SECONDS ?= 60
FUZZ_CI_SECONDS ?= 20

UNITS := systemd/cc-proxy.socket systemd/cc-proxy.service

.PHONY: all build test lint unit-test install install-bin install-units install-docs install-selinux \
	package selinux demo bench bench-quick vm-test fuzz fuzz-ci clean

all: build

build:
	$(CARGO) build --release --workspace

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

# Installs into $(DESTDIR)$(PREFIX) (binary, docs, SELinux module) and
# $(DESTDIR)$(UNITDIR) (units, with @BINDIR@/@DOCDIR@ substituted).
# `build` runs first; cargo makes it a no-op when the binary is current.
install: install-bin install-units install-docs install-selinux

install-bin: build
	install -d -m 0755 $(DESTDIR)$(BINDIR)
	install -m 0755 $(RELEASE_BIN) $(DESTDIR)$(BINDIR)/cc-proxy

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

# Prefer the refpolicy development Makefile (Debian: selinux-policy-dev);
# fall back to the raw tools when it is absent.
selinux: selinux/cc-proxy.pp

selinux/cc-proxy.pp: selinux/cc-proxy.te selinux/cc-proxy.fc selinux/cc-proxy.if
	@if [ -f $(SELINUX_DEVEL_MAKEFILE) ]; then \
		$(MAKE) -C selinux -f $(SELINUX_DEVEL_MAKEFILE) cc-proxy.pp; \
	else \
		echo "$(SELINUX_DEVEL_MAKEFILE) not found (install selinux-policy-dev)"; exit 1; \
	fi

demo:
	bash scripts/demo.sh

bench:
	bash benches/run.sh

bench-quick:
	bash benches/run.sh --quick

vm-test:
	bash tests/vm/run.sh

# fuzz/ is its own cargo workspace built with nightly; see docs/reliability.md.
fuzz:
	bash fuzz/run.sh $(FUZZ_SECONDS)

# Skips with the reason printed when the nightly toolchain or cargo-fuzz is missing.
fuzz-ci:
	bash fuzz/run.sh --ci $(FUZZ_CI_SECONDS)

clean:
	$(CARGO) clean
	rm -rf fuzz/target
	rm -rf selinux/tmp selinux/cc-proxy.pp
