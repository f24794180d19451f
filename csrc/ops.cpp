// The one operator namespace of metalign. Each op family defines its schemas beside its CPU kernel
// (TORCH_LIBRARY_FRAGMENT in <op>_cpu.cpp) and registers CPU/CUDA implementations with
// TORCH_LIBRARY_IMPL; this file only opens the namespace.
#include <torch/library.h>

TORCH_LIBRARY(metalign_ops, m) {}
