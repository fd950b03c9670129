# The two commands a new user needs (see README.md), plus the benchmarks.
.PHONY: demo test bench
demo:
	./scripts/demo.sh
test:
	./scripts/test.sh
bench:
	./scripts/bench.sh
