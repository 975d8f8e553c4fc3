# fastclr developer entry points. `make install && make test` is all a fresh clone needs.
PYTHON ?= python3
PYTEST ?= $(PYTHON) -m pytest

.PHONY: install test test-fast bench bench-compare bench-gpu train clean

install:            ## install fastclr (editable) with test and benchmark tools
	$(PYTHON) -m pip install -e ".[dev]"

test:               ## the whole test suite (CPU; gpu-marked tests skip without CUDA)
	$(PYTEST) tests -q

test-fast:          ## unit tests only, no real-data or multi-process tests
	$(PYTEST) tests -q -m "not slow"

bench:              ## every benchmark group, saved for --benchmark-compare; report in benchmarks/report/
	$(PYTEST) benchmarks -q --benchmark-autosave --benchmark-group-by=group --benchmark-columns=min,median,mean,stddev,rounds
	$(PYTHON) -m benchmarks.report

bench-compare:      ## rerun and compare with the last saved run
	$(PYTEST) benchmarks -q --benchmark-compare --benchmark-group-by=group --benchmark-columns=min,median,mean,stddev,rounds

bench-gpu:          ## GPU check: CUDA benchmark groups + a speedrun; OUT=folder WHEELS=folder-of-kornia-wheels
	bash scripts/gpu_check.sh $(or $(OUT),gpu-results) $(WHEELS)

train:              ## the default run on MNIST
	$(PYTHON) -m fastclr.train

clean:
	rm -rf .pytest_cache .benchmarks benchmarks/report build *.egg-info
