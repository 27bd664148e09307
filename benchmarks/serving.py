"""The serving benchmark: `python benchmarks/serving.py [options]` is `llmos bench [options]`.

See benchmarks/README.md for what it measures; `--help` for the options.
"""

from llmos.cli.bench_cmd import main

if __name__ == "__main__":
    main()
