# Two commands do all set-up: `make serve` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Mooncake's wheel links against Debian's libibverbs even for TCP
IBVERBS := libibverbs1 librdmacm1 ibverbs-providers

.PHONY: serve test lint sysdeps

sysdeps:
	@dpkg -s $(IBVERBS) >/dev/null 2>&1 || { command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(IBVERBS); } || \
		echo "warning: could not install $(IBVERBS); the Mooncake KV transport needs them" >&2

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

serve: sysdeps $(STAMP)
	$(VENV)/bin/ember up --prefill 1 --decode 1 $(ARGS)

test: sysdeps $(STAMP)
	$(VENV)/bin/ruff check ember tests
	$(VENV)/bin/pytest -q $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check ember tests
