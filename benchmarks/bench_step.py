"""The diffusers CogVideoX step / VAE benchmark (the code lives in ``cogvideox_kernels.bench.step``).

    PYTHONPATH=$PWD python3 benchmarks/bench_step.py --out DIR [--preset 5b|2b] [--sections step,vae,other]
"""
import sys

from cogvideox_kernels.bench.step import main

if __name__ == "__main__":
    sys.exit(main())
