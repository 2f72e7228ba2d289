# Two entry points for a newcomer: `make demo` and `make test`. Both set up first.
.PHONY: setup demo test test-unit lint bench fuzz guest-image install uninstall

setup:
	./.ci/setup

demo: setup
	.venv/bin/erofs-passthrough demo

test: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

# The fast tier alone (tests/unit: no root, no mounts, no daemons).
test-unit: setup
	.venv/bin/python -m pytest -q -m unit $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy  # the files and options are in pyproject.toml ([tool.mypy])

bench: setup
	.venv/bin/python -m bench.run

# The fuzz targets (tar reader, EROFS reader, native import, merge) for minutes, under a memory
# and a per-example time limit; findings are saved to tests/fuzz/examples (docs/erofs.md).
FUZZ_SECONDS ?= 300
fuzz: setup
	FUZZ_SECONDS=$(FUZZ_SECONDS) .venv/bin/python -m tests.fuzz $(FUZZ_TARGETS)

# Kernel, initramfs and verified root image of the test guest (cached; docs/passthrough.md).
guest-image: setup
	vm-images/build

# Install the service for real use (docs/containerd.md, "Install"): a virtualenv of its own under
# PREFIX, the command on PATH, the systemd unit and a commented config (never overwritten).
# Needs Debian's python3-venv. Re-run to upgrade; `systemctl daemon-reload` afterwards.
PREFIX ?= /opt/erofs-passthrough
BINDIR ?= /usr/local/bin
UNITDIR ?= /etc/systemd/system
CONFDIR ?= /etc/erofs-passthrough
PYTHON ?= python3

install:
	$(PYTHON) -m venv $(PREFIX)
	rm -rf build  # setuptools reuses build/lib: a module deleted since would be installed again
	$(PREFIX)/bin/pip install -q --disable-pip-version-check .
	$(PREFIX)/bin/pip install -q --disable-pip-version-check --no-deps --force-reinstall .
	install -d -m 0755 $(BINDIR) $(UNITDIR)
	install -d -m 0700 $(CONFDIR)
	ln -sfn $(PREFIX)/bin/erofs-passthrough $(BINDIR)/erofs-passthrough
	ln -sfn $(PREFIX)/bin/erofs-passthrough-mount $(BINDIR)/erofs-passthrough-mount
	sed -e 's|/usr/local/bin/|$(BINDIR)/|g' -e 's|/etc/erofs-passthrough/|$(CONFDIR)/|g' \
	    contrib/systemd/erofs-passthrough.service > $(UNITDIR)/.erofs-passthrough.service.tmp
	chmod 0644 $(UNITDIR)/.erofs-passthrough.service.tmp
	mv $(UNITDIR)/.erofs-passthrough.service.tmp $(UNITDIR)/erofs-passthrough.service
	[ -e $(CONFDIR)/serve.toml ] || install -m 0600 contrib/serve.toml $(CONFDIR)/serve.toml
	@echo "installed $$($(BINDIR)/erofs-passthrough --version); next: systemctl daemon-reload" \
	    "&& systemctl enable --now erofs-passthrough"

# Leaves $(CONFDIR) and the state directory (/var/lib/erofs-passthrough) alone.
uninstall:
	rm -f $(UNITDIR)/erofs-passthrough.service $(BINDIR)/erofs-passthrough
	rm -f $(BINDIR)/erofs-passthrough-mount
	rm -rf $(PREFIX)
