// Compiled only into builds with CUDA kernels. kernels.py looks for this string in a prebuilt library before
// loading it, to tell a CUDA build from a CPU-only one (a library can be loaded once per process: once loaded,
// a CPU-only build could no longer be swapped for one with the CUDA kernels).
extern "C" __attribute__((used, visibility("default"))) const char metalign_ops_cuda_build[] =
    "metalign_ops: built with CUDA kernels";
