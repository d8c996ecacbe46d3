"""Native (C++) kernels for XLA:CPU, compiled on first use (`build.py`)."""
