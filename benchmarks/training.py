"""The training benchmark: `python benchmarks/training.py [options]` is `llmos bench --suite train [options]`.

See benchmarks/README.md for what it measures; `--help` for the options.
"""

import sys

from llmos.cli.bench_cmd import main

if __name__ == "__main__":
    if "--suite" not in sys.argv:
        sys.argv[1:1] = ["--suite", "train"]
    main()
