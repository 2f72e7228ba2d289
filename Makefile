# Two entry points for a newcomer: `make demo` and `make test`. Both set up first.
.PHONY: setup demo test lint bench fuzz guest-image

setup:
	./.ci/setup

demo: setup
	.venv/bin/erofs-passthrough demo

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check .

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
