# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CNNCODES := $(VENV)/bin/cnncodes
SHARED := $(abspath ../shared)
DATA ?= $(if $(wildcard $(SHARED)/datasets/oxford_flowers12),$(SHARED)/datasets/oxford_flowers12,flower_photos)
BACKBONE ?= $(if $(wildcard $(SHARED)/keras-models/efficientnet_lite0_imagenet.keras),$(SHARED)/keras-models/efficientnet_lite0_imagenet.keras,MobileNetV2)
LAYER ?= $(if $(findstring .keras,$(BACKBONE)),--layer avg_pool,)
DEMO_DIR ?= demo

.PHONY: venv browser test test-quick lint docs demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,lite,audit,web,ray,s3,test,dev]'
	touch $@

venv: $(VENV)/.installed

# The browser tests need a Chromium: Debian's package where we are root with apt (as here, offline),
# else Playwright's own build (online); if neither works they skip, and this says why in one line.
browser: venv
	@if command -v chromium >/dev/null 2>&1 || ls $$HOME/.cache/ms-playwright/chromium*/ >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; then :; \
	elif $(PY) -m playwright install chromium >/dev/null 2>&1; then :; \
	else echo "no Chromium (apt-get install chromium, or python -m playwright install chromium): the browser tests will skip"; fi

test: venv browser
	$(PY) -m pytest -q

# The edit-test loop: every test but the slow real-process ones and the ../shared integration tests.
test-quick: venv
	$(PY) -m pytest -q -m "not slow and not integration"

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

docs: venv
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

# Without ../shared the demo fetches TensorFlow's flower_photos archive (online only).
demo: venv
	mkdir -p $(DEMO_DIR)
	if [ "$(DATA)" = flower_photos ]; then $(PY) -c "import keras, os; p = keras.utils.get_file('flower_photos', 'https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz', untar=True); print(os.path.join(p, 'flower_photos') if os.path.isdir(os.path.join(p, 'flower_photos')) else p)" > $(DEMO_DIR)/data.txt; else echo "$(DATA)" > $(DEMO_DIR)/data.txt; fi
	$(CNNCODES) train "$$(cat $(DEMO_DIR)/data.txt)" --backbone $(BACKBONE) $(LAYER) --cache $(DEMO_DIR)/features.h5 --out $(DEMO_DIR)/model
	$(CNNCODES) predict "$$(cat $(DEMO_DIR)/data.txt)" --head $(DEMO_DIR)/model --top-k 3 --out $(DEMO_DIR)/predictions.csv
	$(CNNCODES) audit $(DEMO_DIR)/features.h5 --head $(DEMO_DIR)/model --out $(DEMO_DIR)/audit
	$(CNNCODES) report $(DEMO_DIR)/model --audit $(DEMO_DIR)/audit --projection pca --out $(DEMO_DIR)/report.html
	@echo
	@echo "Open the report in a browser: file://$(abspath $(DEMO_DIR))/report.html"
	@echo "Try your own photos: $(CNNCODES) serve --head $(DEMO_DIR)/model   then open http://127.0.0.1:8000/"

clean:
	rm -rf $(VENV) $(DEMO_DIR) site cache/*.h5 cache/*.shards cache/*.tflite heads runs compare audits studies
