"""numba.cuda kernels. Shared device code lives in `online_softmax`; one module per kernel family."""
