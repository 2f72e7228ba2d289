# Two entry points for a newcomer: `make demo` and `make test`. Both set up first.
.PHONY: setup demo test lint bench guest-image

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

# Kernel, initramfs and verified root image of the test guest (cached; docs/passthrough.md).
guest-image: setup
	vm-images/build
