"""CogVideoX built from the modules in ``cogvideox_kernels.nn``."""
