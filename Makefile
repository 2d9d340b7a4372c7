# shoal developer entry points. Works as root on a fresh Debian 12 machine.
#   make venv   .venv with shoal (editable) + test tools, and the Debian tools the runtime needs
#   make test   lint + type check + the whole test suite (what CI runs through .ci/run)
#   make demo   the 3-host failover demo (needs root)
#   make lint   ruff + mypy only
#   make docs   regenerate the generated parts of docs/api.md (spec reference, route tables)
#   make scale-lab  5 managers + 100 workers on netns hosts, measured (bench/scale_lab.py;
#               ~10 min, loads the whole machine; SCALE_ARGS passes options), then torn down
#   make sweep  remove leftovers of crashed test/demo labs (namespaces, processes, data dirs)
#   make clean  sweep, then remove the venv and caches

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Debian packages the runtime and the lab use: ip (iproute2), unshare/setsid/nsenter
# (util-linux), tini (init inside each task), ps/pgrep (procps), libseccomp2 (tasks' seccomp filters).
# tests/test_ansible.py: sshd per lab host (openssh-server); its hosts have no network, so what
# the Ansible role installs must already be here: iptables, gcc + libc6-dev (the task launcher
# is compiled on each host).
# tests/test_registry*.py: a real registry (docker-registry), pushes with skopeo, htpasswd (apache2-utils).
# tests/test_mqtt*.py, bench/mqtt_latency.py: a real MQTT broker (mosquitto) and its clients.
# tests/test_dashboard*.py: a real headless browser (chromium, driven by Playwright).
DEB_PKGS := iproute2 util-linux tini procps libseccomp2 openssh-server sshfs iptables gcc libc6-dev zstd busybox-static \
	    docker-registry skopeo apache2-utils mosquitto mosquitto-clients chromium
# Only the harness files are type-checked here; pyproject's [tool.mypy] files cover the package.
HARNESS  := tests/netlab.py tests/labstate.py tests/conftest.py tests/test_netlab.py tests/helpers.py \
            tests/feedrig.py demo/demo.py tests/jepsen.py tests/jepsen_check.py
# mypy sees the package as shoal.* through this symlink tree (shoal/node -> ../../../node, ...),
# made from pyproject's package-dir on every lint: mypy cannot follow the editable install's
# import hook. It is git-ignored and only type checking reads it.
MYPY_TREE := build/mypy

.PHONY: venv test lint mypy-tree demo sweep clean faults-long scale-lab

venv: $(STAMP)

$(STAMP): pyproject.toml
	@missing=""; \
	for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	$(PYTHON) -c 'import ensurepip, venv; ensurepip.version()' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

lint: venv mypy-tree
	$(BIN)/ruff check .
	$(BIN)/mypy
	MYPYPATH=tests $(BIN)/mypy $(HARNESS)

mypy-tree: venv
	@rm -rf $(MYPY_TREE)
	@$(BIN)/python -c 'import pathlib, tomllib; \
	  dirs = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]; \
	  root = pathlib.Path("$(MYPY_TREE)/shoal"); root.mkdir(parents=True); \
	  assert all(n.count(".") == 1 and n.startswith("shoal.") for n in dirs), dirs; \
	  [(root / n.split(".")[1]).symlink_to(pathlib.Path("../../..", d)) for n, d in dirs.items()]'

test: lint
	$(BIN)/pytest -q --durations=30

# regenerate the generated parts of docs/ (the spec reference in docs/api.md)
docs: venv
	$(BIN)/python docs/gen_spec_reference.py
	$(BIN)/python -m shoal.node.openapi --docs docs/api.md

# the long fault suite (docs/reliability.md): 5 managers + 3 workers, 30 min of faults;
# FAULT_SEED / FAULT_DURATION override, the history goes to .faults-history.jsonl
FAULT_SEED ?= $(shell date +%s)
FAULT_DURATION ?= 1800
faults-long: venv
	$(BIN)/python tests/jepsen.py --managers 5 --workers 3 --duration $(FAULT_DURATION) \
	  --seed $(FAULT_SEED) --history .faults-history.jsonl

demo: venv
	$(BIN)/python demo/demo.py

# docs/scaling.md: e.g. SCALE_ARGS="--sizes 10,50,100 --join-wave 10 --window 20"
SCALE_ARGS ?=
scale-lab: venv
	$(BIN)/python bench/scale_lab.py $(SCALE_ARGS)

sweep:
	@if [ -x $(BIN)/python ]; then py=$(BIN)/python; else py=$(PYTHON); fi; \
	$$py tests/netlab.py sweep

clean: sweep
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .demo build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
