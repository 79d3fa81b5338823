# fnq: `make run` to try it, `make test` to check it. Both set up what is missing first.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test run lint typecheck unit bench images docs clean

setup:
	scripts/setup.sh

test: setup lint typecheck
	$(BIN)/pytest -p no:cacheprovider

run: setup
	scripts/run-example.sh

lint: setup-venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check config mq datastore worker tests bench scripts

typecheck: setup-venv
	$(BIN)/mypy config mq datastore worker bench scripts/update-config-docs.py

unit: setup-venv
	$(BIN)/pytest -p no:cacheprovider -m "not integration"

bench: setup
	$(BIN)/python -m bench

images: setup-venv
	$(BIN)/fnq images build scripts/functions/example tests/functions/*/

docs: setup-venv
	$(BIN)/python scripts/update-config-docs.py

.PHONY: setup-venv
setup-venv:
	@scripts/setup.sh --no-images >/dev/null

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
