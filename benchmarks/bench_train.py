"""Training throughput benchmark (same as `phi3v-tune bench`): phi3v-tune vs a plain Hugging Face build.

Usage (one GPU): python benchmarks/bench_train.py --results benchmarks/RESULTS.md
See `python benchmarks/bench_train.py --help` for every flag; the code is in src/phi3v_tune/perf/.
"""

from phi3v_tune.perf.bench import main

if __name__ == "__main__":
    main()
