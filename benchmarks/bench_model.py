"""DeepLabV3-DenseNet121 training step and eval forward against PyTorch: a thin wrapper of ``minideeplab bench``.

    .venv/bin/python benchmarks/bench_model.py [--device cuda] [--os 16] [--quick] ...   (see --help)
"""
import sys

from minideeplab.bench import main

if __name__ == "__main__":
    sys.exit(main())
