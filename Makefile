# The two commands a new user needs (see README.md), plus the benchmarks.
.PHONY: demo test bench
demo:
	./tests/scripts/demo.sh
test:
	./tests/scripts/test.sh
bench:
	./tests/scripts/bench.sh
