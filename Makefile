# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.setup-stamp
# DDS stays on loopback in everything we run; tests pick their own ROS_DOMAIN_ID.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup setup-sim test test-fast demo bench demo-policy metaworld-policy clean
SIM_STAMP := $(VENV)/.setup-sim-stamp
# Meta-World renders off-screen through EGL (Debian packages below); MUJOCO_GL=osmesa needs libosmesa6 instead.
SIM_APT := libegl1 libegl-mesa0 libgl1-mesa-dri
export MUJOCO_GL ?= egl
DEMO_STEPS ?= 9000
DEMO_EPISODES ?= 300
DEMO_TASKS ?=  # empty: all nine tasks
# Token agreement the export's decoding calibration keeps (docs/benchmarks/decoding_pareto.md: at 0.65 the demo decodes
# in blocks of 6 with <= 2 passes, 7.2 NFE, within noise of its best setting; token agreement understates this policy)
DEMO_CALIBRATION_LEVEL ?= 0.65

setup: $(STAMP)

# Re-runs only when the dependency lists change (idempotent, fast when nothing changed).
$(STAMP): requirements.txt setup.py package.xml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 2>&1 | grep -v 'is ignored' || true
	# CPU build of torch (an unpinned torch pulls a multi-GB CUDA build); GPU users: see README.
	$(PIP) install -q torch==2.13.0 2>&1 | grep -v 'is ignored' ; test $${PIPESTATUS[0]} -eq 0
	$(PIP) install -q -r requirements.txt 2>&1 | grep -v 'is ignored' ; test $${PIPESTATUS[0]} -eq 0
	$(PIP) install -q --no-deps -e . 2>&1 | grep -v 'is ignored' ; test $${PIPESTATUS[0]} -eq 0
	$(PY) -c "import torch, transformers, onnxruntime, rosbags, rclpy, cv2" 
	touch $(STAMP)

# The optional Meta-World extra (pip install .[sim]) and the EGL libraries it renders with (apt-get, as root, only
# when they are missing); then one rendered frame proves the set-up.
setup-sim: $(SIM_STAMP)

$(SIM_STAMP): $(STAMP) setup.py
	@if ! ldconfig -p | grep -q 'libEGL_mesa.so.0'; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SIM_APT); \
		else echo "Meta-World needs EGL: sudo apt-get install $(SIM_APT)"; exit 1; fi; \
	fi
	$(PIP) install -q -e '.[sim]' 2>&1 | grep -v 'is ignored' ; test $${PIPESTATUS[0]} -eq 0
	$(PY) -c "from blockvla_ros.sim.env import MetaWorldEnv; MetaWorldEnv('reach-v3').reset()"
	touch $(SIM_STAMP)

test: setup setup-sim
	$(PY) -m pytest -q -ra --durations=20 test

# Skips the slow end-to-end tests (marked `slow`).
test-fast: setup setup-sim
	$(PY) -m pytest -q -ra -m "not slow" test

demo: setup
	ROS_DOMAIN_ID=$${ROS_DOMAIN_ID:-61} $(PY) -m blockvla_ros.demo

# The shipped demo policy and sample recording (config/train/demo.yaml; fixed seeds; CPU). The backbone folder and
# the pretrained patch encoder are the recipe's starting points (see the config's header).
demo-policy: setup
	rm -rf data/demo_train runs/demo runs/demo_backbone runs/demo_vision.safetensors
	$(VENV)/bin/blockvla-task make-backbone --out runs/demo_backbone --seed 0
	$(VENV)/bin/blockvla-task pretrain-vision --config config/train/demo.yaml --out runs/demo_vision.safetensors --seed 0
	$(VENV)/bin/blockvla-task record --out data/demo_train $(if $(strip $(DEMO_TASKS)),--tasks $(DEMO_TASKS)) --episodes $(DEMO_EPISODES) \
		--noise 0.1 --seed 0
	$(VENV)/bin/blockvla-train --config config/train/demo.yaml train.steps=$(DEMO_STEPS) --no-progress
	$(VENV)/bin/blockvla-export --checkpoint $$(ls -d runs/demo/checkpoints/step_* | tail -n 1) --out models/demo \
		--calibration-level $(DEMO_CALIBRATION_LEVEL)
	rm -rf data/demo_recording
	$(VENV)/bin/blockvla-task record --out data/demo_recording --episodes 1 --tasks touch_red_then_blue --seed 1

# The shipped Meta-World MT10 policy (config/train/metaworld_mt10.yaml; fixed seeds; CPU; see README).
MT10_EPISODES ?= 50
metaworld-policy: setup setup-sim
	rm -rf data/mt10_train runs/mt10 runs/mt10_backbone
	$(VENV)/bin/blockvla-sim make-backbone --out runs/mt10_backbone --seed 0
	$(VENV)/bin/blockvla-sim record --out data/mt10_train --suite mt10 --episodes $(MT10_EPISODES) --seed 0
	$(VENV)/bin/blockvla-train --config config/train/metaworld_mt10.yaml --no-progress
	$(VENV)/bin/blockvla-export --checkpoint $$(ls -d runs/mt10/checkpoints/step_* | tail -n 1) \
		--out models/metaworld_mt10
	$(VENV)/bin/blockvla-sim evaluate --policy models/metaworld_mt10 --suite mt10 --episodes 50 --seed 1 --jobs 3 \
		--out reports/metaworld_mt10_seed1

bench: setup
	mkdir -p out
	$(PY) benchmarks/decode_latency.py --json out/decode_latency.json
	$(PY) benchmarks/control_loop.py --rate 50 --seconds 20 --json out/control_loop.json
	$(PY) benchmarks/data_pipeline.py

clean:
	rm -rf build install log out .pytest_cache
