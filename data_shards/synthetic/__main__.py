"""``python -m data_shards.synthetic OUT_DIR [--mode procedural --n-cells N ...]``: write one bundle."""

from .bundle import main

if __name__ == "__main__":
    main()
