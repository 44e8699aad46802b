# Shortcuts for the scripts in scripts/ (which are what README and CI call).
.PHONY: host test demo bench
host:
	bash scripts/host.sh setup
test:
	bash scripts/test.sh
demo:
	bash scripts/demo.sh
bench: host
	HF_HUB_OFFLINE=1 $$(bash scripts/host.sh python) benchmarks/capture_overhead.py
