# slurmgate developer entry points. Run as root on Debian 12:
#   make demo          install, start the local Slurm dev cluster, run the demo
#   make test          install, start the cluster, run every test (PYTEST_ARGS="-k tags -x")
#   make unit          install, run the tests that need no cluster (tests/unit, about a minute)
#   make check         ruff, the type checker (mypy) and the import contracts (lint-imports)
#   make stop | status | logs [N=100] | lint
# Another Slurm: add SLURM=24.11 or SLURM=26.05 (or 22.05) to install, cluster, stop, status,
# logs, test, unit, check or demo: the same target runs inside a Debian chroot carrying that
# Slurm (contrib/devcluster/chroot.sh builds and caches it), with its cluster in
# .devcluster-<version> on its own ports, beside the host's. Without SLURM= the host's Slurm.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= /opt/slurmgate/venv
PYTHON ?= /usr/bin/python3
DEVCLUSTER_DIR ?= $(CURDIR)/.devcluster
PYTEST_ARGS ?=
N ?= 50
SLURM ?=

export SLURMGATE_VENV := $(VENV)
export DEVCLUSTER_DIR
CLUSTER := bash contrib/devcluster/cluster.sh
WITH_CLUSTER_ENV := source $(DEVCLUSTER_DIR)/env.sh &&

.PHONY: help venv install cluster stop status logs test unit test-deps packages print-packages \
	lint check demo

help:
	@echo "targets: venv install cluster stop status logs [N=50] test unit [PYTEST_ARGS=...] lint check demo"
	@echo "         ha-cluster ha-stop ha [ARGS=status|kill-primary|start-primary]  (host Slurm only)"
	@echo "         add SLURM=<$$(bash contrib/devcluster/chroot.sh versions | paste -sd'|')> to run one in that Slurm's chroot"
	@echo "venv: $(VENV)   cluster state: $(DEVCLUSTER_DIR)"

# What only the tests need: headless Chromium renders the HTML statement, systemd-analyze
# verifies the units (and runs man on their Documentation= pages), logrotate checks its config.
TEST_PACKAGES := chromium logrotate systemd man-db

test-deps:
	@missing=""; for p in $(TEST_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q '^install ok installed' \
			|| missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi

# Every Debian package `make test` needs: the dev cluster's (cluster.sh) and the tests'.
# chroot.sh installs these inside a chroot with `make packages`, and keys its cache on the list.
print-packages:
	@printf '%s\n' $(TEST_PACKAGES) $$($(CLUSTER) packages)

packages: test-deps
	@$(CLUSTER) install-packages

ifneq ($(SLURM),)
# ---------------------------------------------------------------- SLURM=<version>
# The target runs again inside the chroot (SLURM= there: the chroot's Slurm is the local one).
# chroot.sh run sets DEVCLUSTER_DIR=<repo>/.devcluster-<version> and the version's ports; the
# venv is the chroot's own /opt/slurmgate/venv.
CHROOT := bash contrib/devcluster/chroot.sh
IN_CHROOT_TARGETS := venv install cluster test unit lint check demo
shell_quote = '$(subst ','\'',$(1))'
IN_CHROOT = $(CHROOT) run $(SLURM) -- make --no-print-directory -C $(CURDIR) $@ SLURM= \
	PYTEST_ARGS=$(call shell_quote,$(PYTEST_ARGS)) N=$(N)

.PHONY: $(IN_CHROOT_TARGETS)
$(IN_CHROOT_TARGETS):
	$(CHROOT) build $(SLURM)
	$(IN_CHROOT)

.PHONY: status logs
status logs:
	@$(IN_CHROOT)

# Stops the cluster, then the chroot's munged, and unmounts what chroot.sh run mounted.
stop:
	@if [ -f "$$($(CHROOT) path $(SLURM))/.slurmgate-chroot-complete" ]; then $(IN_CHROOT); fi
	$(CHROOT) umount $(SLURM)

else
# ---------------------------------------------------------------- the host's Slurm

# The venv lives outside the repo and must be world-readable: user jobs and the Slurm hooks
# (run by slurmd/slurmctld) execute it.
venv:
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv; }
	@if [ ! -x $(VENV)/bin/python ]; then \
		umask 022 && mkdir -p $(dir $(VENV)) && $(PYTHON) -m venv $(VENV) && \
		$(VENV)/bin/pip install -q --upgrade pip; fi

# Non-editable on purpose (see venv). The second pip run replaces only our own package, so
# code changes always land even when the version number did not change.
install: venv
	umask 022 && $(VENV)/bin/pip install -q '.[dev,parquet,postgresql]' && \
		$(VENV)/bin/pip install -q --force-reinstall --no-deps .
	@chmod -R a+rX $(VENV)

cluster: install
	$(CLUSTER) start

stop:
	$(CLUSTER) stop

status:
	@$(CLUSTER) status || true

logs:
	$(CLUSTER) logs $(N)

test: test-deps cluster
	$(WITH_CLUSTER_ENV) $(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# tests/unit needs no Slurm; tests/cluster drives the real dev cluster (make test runs both).
unit: test-deps install
	$(VENV)/bin/python -m pytest -q tests/unit $(PYTEST_ARGS)

$(VENV)/bin/ruff:
	$(MAKE) install

lint: $(VENV)/bin/ruff
	$(VENV)/bin/ruff check .

# The house, checked: style, types (files listed in pyproject's [tool.mypy]) and the layering
# contracts in pyproject's [tool.importlinter]. Run from the repository root.
check: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	PYTHONPATH=$(CURDIR) $(VENV)/bin/lint-imports

demo: cluster
	$(WITH_CLUSTER_ENV) bash contrib/examples/demo.sh

# The HA dev cluster (contrib/devcluster/ha.sh): a primary and a backup slurmctld, each with
# its own daemon, one PostgreSQL ledger; beside the default cluster, on its own ports.
# `make ha-cluster`, then e.g. `make ha ARGS=kill-primary` (status | kill-primary | start-primary).
HA_ENV := DEVCLUSTER_HA=1 DEVCLUSTER_DIR=$(CURDIR)/.devcluster-ha
.PHONY: ha-cluster ha-stop ha
ha-cluster: install
	$(HA_ENV) $(CLUSTER) start

ha-stop:
	$(HA_ENV) $(CLUSTER) stop

ha:
	$(HA_ENV) $(CLUSTER) ha $(or $(ARGS),status)

endif
