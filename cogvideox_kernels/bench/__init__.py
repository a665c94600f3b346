"""The benchmark suite behind ``cogvideox-kernels bench``."""
